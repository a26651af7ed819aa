"""fgclip-export: a TP=2 training checkpoint -> a folder that transformers' CLIPModel loads with
the embeddings the project's (TP=2) model computes, and the released FG-CLIP layout, which
round-trips bitwise with transformers' CLIP key names plus FG-CLIP's five extras."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.builders import sample_inputs
from tests.distributed import run_distributed

# FG-CLIP's parameters beyond CLIPModel's, as the released model (upstream fgclip.py) names them.
FGCLIP_EXTRAS = {
    "text_model.embeddings.position_embedding_ori.weight",
    "text_model.embeddings.position_embedding_res.weight",
    "text_filip_projection.weight",
    "logit_scale_finegraind",
    "logit_scale_hardneg",
}


def _inputs(model_cfg):
    images, short = sample_inputs(model_cfg, 3, 4, model_cfg.text.short_context, seed=11)
    _, long = sample_inputs(model_cfg, 1, 3, model_cfg.text.long_context, seed=12)
    return images, short, long


def _train_tp2_and_embed(tmp: str) -> dict:
    """Trains 3 steps at TP=2 x DP=1 (checkpoints at steps 2 and 3), then embeds fixed inputs
    with the project's TP=2 model loaded from the last checkpoint (the evaluation's path)."""
    from fgclip_mega.checkpoint.weights import load_training_weights, training_checkpoint
    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.train.loop import train
    from tests.builders import train_config

    tmp = Path(tmp)
    cfg = train_config(tmp / "run", tmp / "data", 3, parallel__tensor_parallel_size=2,
                       train__eval_batches=0, checkpoint__save_interval=2)  # fmt: skip
    result = train(cfg, keep_process_groups=True)
    step_dir = training_checkpoint(tmp / "run")
    model = FGCLIPModel(cfg.model, cfg.parallel).eval()
    info = load_training_weights(model, step_dir)
    images, short, long = _inputs(cfg.model)
    with torch.no_grad():
        out = {
            "image": model.encode_image(images),
            "short": model.encode_text(short),
            "long": model.encode_text(long, long=True),
            "logit_scale": model.logit_scale.detach().clone(),
        }
    return {**out, "checkpoint": result.checkpoint, "step": info["step"],
            "saved_layout": info["saved_layout"]}  # fmt: skip


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_tp2")
    results = run_distributed(_train_tp2_and_embed, 2, str(tmp), timeout=600)
    for key in ("image", "short", "long"):  # both TP ranks hold the full embeddings
        assert torch.equal(results[0][key], results[1][key]), key
    return tmp, results[0]


@pytest.mark.slow
def test_hf_clip_export_loads_in_clipmodel_with_the_projects_embeddings(tp2, capsys):
    from transformers import CLIPModel

    from fgclip_mega.checkpoint.export import main

    tmp, ours = tp2
    assert ours["step"] == 3 and ours["saved_layout"]["tp_size"] == 2
    out = tmp / "hf"
    assert main([str(tmp / "run"), str(out)]) == 0  # the run dir: newest checkpoint
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 3 and printed["format"] == "hf-clip"
    assert printed["source"].endswith("step_00000003")
    hf, loading = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in loading.values()), loading  # no missing/unexpected keys
    hf = hf.eval()
    images, short, _ = _inputs_of(tmp)
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=images).pooler_output
        text = hf.get_text_features(input_ids=short).pooler_output
    err_i = (image - ours["image"]).abs().max().item()
    err_t = (text - ours["short"]).abs().max().item()
    assert err_i <= 1e-5 and err_t <= 1e-5, (err_i, err_t)
    assert ours["image"].abs().max() > 0.1  # not a trivially small embedding
    assert torch.equal(hf.logit_scale.detach(), ours["logit_scale"])


def _inputs_of(tmp: Path):
    from fgclip_mega.checkpoint.weights import saved_config, training_checkpoint
    from fgclip_mega.config import Config, apply_dict

    cfg = apply_dict(Config(), saved_config(training_checkpoint(tmp / "run")))
    return _inputs(cfg.model)


@pytest.mark.slow
def test_fgclip_export_round_trips_bitwise_with_the_released_key_names(tp2, world):
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from fgclip_mega.checkpoint import export_hf_state_dict, import_hf_state_dict, integrity
    from fgclip_mega.checkpoint.export import export_checkpoint
    from fgclip_mega.checkpoint.hf_config import clip_config
    from fgclip_mega.checkpoint.weights import saved_config, training_checkpoint
    from fgclip_mega.config import Config, ParallelConfig, apply_dict
    from fgclip_mega.models import FGCLIPModel

    tmp, ours = tp2
    step2 = tmp / "run" / "checkpoints" / "step_00000002"
    out = export_checkpoint(tmp / "run" / "checkpoints", tmp / "fg", "fgclip")
    state = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["FGCLIPModel"]

    step_dir = training_checkpoint(tmp / "run")
    cfg = apply_dict(Config(), saved_config(step_dir))
    clip_keys = set(CLIPModel(clip_config(cfg.model)).state_dict())
    clip_keys = {k for k in clip_keys if not k.endswith("position_ids")}
    assert set(state) == clip_keys | FGCLIP_EXTRAS  # exact names, nothing more or less

    # Into the project's model (TP=1 here) and out again: the same bits; the long-text path
    # (the _ori/_res tables and text_filip_projection) embeds as the TP=2 model did.
    model = FGCLIPModel(cfg.model, ParallelConfig()).eval()
    assert import_hf_state_dict(model, out) == {"derived": []}
    again = export_hf_state_dict(model)
    assert sorted(again) == sorted(state)
    assert all(torch.equal(again[k], state[k]) for k in state)
    saved = integrity.load_torch(step_dir, "model.pt", integrity.read_manifest(step_dir))
    assert torch.equal(state["logit_scale_hardneg"], saved["logit_scale_hardneg"])
    images, short, long = _inputs(cfg.model)
    with torch.no_grad():
        assert (model.encode_text(long, long=True) - ours["long"]).abs().max() <= 1e-5
        assert (model.encode_image(images) - ours["image"]).abs().max() <= 1e-5

    # An older step dir is exported as asked, and differs from the newest.
    older = load_file(str(export_checkpoint(step2, tmp / "fg2", "fgclip") / "model.safetensors"))
    assert not torch.equal(older["visual_projection.weight"], state["visual_projection.weight"])


def test_export_of_a_non_checkpoint_is_one_line_and_writes_nothing(tmp_path, capsys):
    from fgclip_mega.checkpoint.export import main

    (tmp_path / "not_a_run").mkdir()
    out = tmp_path / "out"
    assert main([str(tmp_path / "not_a_run"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "not_a_run" in err[0], err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(out), "--format", "onnx"])  # argparse names the choices


def test_the_export_command_starts_without_torch():
    import subprocess
    import sys

    probe = ("import sys, fgclip_mega.checkpoint.export as e\n"
             "assert not {'torch', 'megatron'} & set(sys.modules)\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
