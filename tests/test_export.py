"""fgclip-export: TP=2 and DP=2 (distributed optimizer) training checkpoints -> folders that
transformers' CLIPModel loads with the embeddings the project's model of that layout computes, and
the released FG-CLIP layout, which round-trips bitwise with transformers' CLIP key names plus
FG-CLIP's five extras."""

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


# Checkpoints of both sharded kinds: TP=2 x DP=1, and TP=1 x DP=2 with the distributed optimizer.
LAYOUTS = {
    "tp2": {"parallel__tensor_parallel_size": 2},
    "dp2": {"parallel__use_distributed_optimizer": True},
}


def _train_and_embed(tmp: str) -> dict:
    """For each layout: trains 3 steps (checkpoints at steps 2 and 3), then embeds fixed inputs
    with the project's model of that layout loaded from the last checkpoint (the evaluation's
    path)."""
    from megatron.core import parallel_state as ps

    from fgclip_mega.checkpoint.weights import load_training_weights, training_checkpoint
    from fgclip_mega.models import FGCLIPModel
    from fgclip_mega.train.loop import train
    from tests.builders import train_config

    tmp = Path(tmp)
    results = {}
    for name, extra in LAYOUTS.items():
        if results:
            ps.destroy_model_parallel()  # keep torch.distributed, choose the next TP size
        cfg = train_config(tmp / name, tmp / "data", 3, train__eval_batches=0,
                           checkpoint__save_interval=2, **extra)  # fmt: skip
        result = train(cfg, keep_process_groups=True)
        model = FGCLIPModel(cfg.model, cfg.parallel).eval()
        info = load_training_weights(model, training_checkpoint(tmp / name))
        images, short, long = _inputs(cfg.model)
        with torch.no_grad():
            results[name] = {
                "image": model.encode_image(images),
                "short": model.encode_text(short),
                "long": model.encode_text(long, long=True),
                "logit_scale": model.logit_scale.detach().clone(),
                "checkpoint": result.checkpoint,
                "step": info["step"],
                "saved_layout": info["saved_layout"],
            }
    return results


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export_runs")
    results = run_distributed(_train_and_embed, 2, str(tmp), timeout=900)
    for name in LAYOUTS:
        for key in ("image", "short", "long"):  # both ranks hold the full embeddings
            assert torch.equal(results[0][name][key], results[1][name][key]), (name, key)
    return tmp, results[0]


@pytest.mark.slow
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_clip_export_loads_in_clipmodel_with_the_projects_embeddings(trained, layout, capsys):
    from transformers import CLIPModel

    from fgclip_mega.checkpoint.export import main

    tmp, results = trained
    ours = results[layout]
    saved = ours["saved_layout"]
    assert ours["step"] == 3 and (saved["tp_size"], saved["dp_size"]) == (
        (2, 1) if layout == "tp2" else (1, 2)
    )
    out = tmp / f"hf_{layout}"
    assert main([str(tmp / layout), str(out)]) == 0  # the run dir: newest checkpoint
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["step"] == 3 and printed["format"] == "hf-clip"
    assert printed["source"].endswith("step_00000003")
    hf, loading = CLIPModel.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in loading.values()), loading  # no missing/unexpected keys
    hf = hf.eval()
    images, short, _ = _inputs_of(tmp / layout)
    with torch.no_grad():
        image = hf.get_image_features(pixel_values=images).pooler_output
        text = hf.get_text_features(input_ids=short).pooler_output
    err_i = (image - ours["image"]).abs().max().item()
    err_t = (text - ours["short"]).abs().max().item()
    print(json.dumps({"layout": layout, "max_abs_err_image": err_i, "max_abs_err_text": err_t}))
    assert err_i <= 1e-5 and err_t <= 1e-5, (err_i, err_t)
    assert ours["image"].abs().max() > 0.1  # not a trivially small embedding
    assert torch.equal(hf.logit_scale.detach(), ours["logit_scale"])


def _inputs_of(run: Path):
    from fgclip_mega.checkpoint.weights import saved_config, training_checkpoint
    from fgclip_mega.config import Config, apply_dict

    cfg = apply_dict(Config(), saved_config(training_checkpoint(run)))
    return _inputs(cfg.model)


@pytest.mark.slow
def test_fgclip_export_round_trips_bitwise_with_the_released_key_names(trained, world):
    from safetensors.torch import load_file
    from transformers import CLIPModel

    from fgclip_mega.checkpoint import export_hf_state_dict, import_hf_state_dict, integrity
    from fgclip_mega.checkpoint.export import export_checkpoint
    from fgclip_mega.checkpoint.hf_config import clip_config
    from fgclip_mega.checkpoint.weights import saved_config, training_checkpoint
    from fgclip_mega.config import Config, ParallelConfig, apply_dict
    from fgclip_mega.models import FGCLIPModel

    tmp, results = trained
    ours, run = results["tp2"], tmp / "tp2"
    step2 = run / "checkpoints" / "step_00000002"
    out = export_checkpoint(run / "checkpoints", tmp / "fg", "fgclip")
    state = load_file(str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["FGCLIPModel"]

    step_dir = training_checkpoint(run)
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
