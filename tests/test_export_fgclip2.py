"""fgclip-export of an FG-CLIP 2 run: a DP=2 distributed-optimizer training checkpoint -> a folder
transformers' Siglip2Model loads with the embeddings the project's model computes from that
checkpoint, and the released FG-CLIP 2 layout, which imports back bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.builders import tiny_fgclip2_run_config
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow  # a spawned DP=2 training run: ~1-2 min on the shared CPU


def _train(tmp: str) -> str:
    """Stage 2 (every head trained), 2 steps at DP=2 with the distributed optimizer."""
    from fgclip_mega.train.loop import train

    cfg = tiny_fgclip2_run_config(Path(tmp), "regional")
    cfg.parallel.use_distributed_optimizer = True
    cfg.train.steps = 2
    return train(cfg).checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("export_fgclip2")
    return Path(run_distributed(_train, 2, str(tmp))[0])


def _our_model(step_dir: Path):
    from fgclip_mega.checkpoint.training import read_meta
    from fgclip_mega.checkpoint.weights import load_training_weights
    from fgclip_mega.config import Config, apply_dict
    from fgclip_mega.models.fgclip2 import FGCLIP2Model

    cfg = apply_dict(Config(), read_meta(step_dir)["config"])
    model = FGCLIP2Model(cfg.model, cfg.parallel)
    load_training_weights(model, step_dir)
    return cfg, model.eval()


def test_siglip2_export_loads_in_transformers_with_the_projects_embeddings(
    checkpoint, tmp_path, world
):
    from transformers import Siglip2Model

    from fgclip_mega.checkpoint.export import main
    from fgclip_mega.data.naflex import pack_images

    assert main([str(checkpoint), str(tmp_path / "hf")]) == 0  # default format: siglip2
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "siglip2" and config["architectures"] == ["Siglip2Model"]
    hf = Siglip2Model.from_pretrained(tmp_path / "hf").eval()
    cfg, model = _our_model(checkpoint)
    gen = torch.Generator().manual_seed(0)
    p = cfg.model.vision.patch_size
    images = [
        torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8)
        for h, w in ((40, 96), (64, 64), (88, 24))
    ]
    pixels, valid, grids = pack_images(images, p, 128)
    tokens = torch.randint(0, cfg.model.text.vocab_size, (4, 64), generator=gen)
    with torch.no_grad():
        ref_image = hf.get_image_features(
            pixel_values=pixels, pixel_attention_mask=valid.long(), spatial_shapes=grids
        )
        ref_text = hf.get_text_features(input_ids=tokens)
        image = model.encode_image(pixels, valid, grids.tolist())
        text = model.encode_text(tokens, "short")
    torch.testing.assert_close(image, getattr(ref_image, "pooler_output", ref_image))
    torch.testing.assert_close(text, getattr(ref_text, "pooler_output", ref_text))
    # Trained, not the initial copies: the box head moved away from the short head in stage 2.
    assert not torch.equal(model.boxtext_head.weight, model.text_head.weight)


def test_fgclip2_export_has_the_released_keys_and_imports_back_bitwise(checkpoint, tmp_path, world):
    from safetensors.torch import load_file

    from fgclip_mega.checkpoint.export import main
    from fgclip_mega.checkpoint.hf_fgclip2 import EXTRAS, import_fgclip2_state_dict
    from fgclip_mega.models.fgclip2 import FGCLIP2Model

    assert main([str(checkpoint), str(tmp_path / "fg"), "--format", "fgclip2"]) == 0
    config = json.loads((tmp_path / "fg" / "config.json").read_text())
    assert config["model_type"] == "fgclip2"
    assert (config["text_config"]["keep_len"], config["text_config"]["longtext_len"]) == (20, 196)
    state = load_file(str(tmp_path / "fg" / "model.safetensors"))
    assert {hf for hf, _ in EXTRAS.values()} <= set(state)
    assert state["logit_scale"].shape == (1,) and state["logit_scale_hardneg"].shape == ()
    cfg, trained = _our_model(checkpoint)
    fresh = FGCLIP2Model(cfg.model, cfg.parallel)
    assert import_fgclip2_state_dict(fresh, state)["derived"] == []
    for (name, a), b in zip(fresh.named_parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_v1_format_for_a_fgclip2_run_is_one_error_line(checkpoint, tmp_path, capsys):
    from fgclip_mega.checkpoint.export import main

    assert main([str(checkpoint), str(tmp_path / "x"), "--format", "fgclip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exports as --format siglip2 or fgclip2" in err[0], err
    assert not (tmp_path / "x").exists()
