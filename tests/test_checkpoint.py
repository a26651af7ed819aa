"""HF / FG-CLIP checkpoint import and export at TP=1 (TP=2/4 round trips: test_model_tp2.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from fgclip_mega.config import ParallelConfig
from tests.builders import build_model, fgclip_layout, perturbed_clip, small_config


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys that differ in presence, shape, dtype or any bit."""
    bad = sorted(set(a) ^ set(b))
    for k in set(a) & set(b):
        if a[k].shape != b[k].shape or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]):
            bad.append(k)
    return bad


def test_fgclip_layout_round_trips_bitwise(world):
    from fgclip_mega.checkpoint import export_hf_state_dict, import_hf_state_dict

    cfg = small_config()
    sd = fgclip_layout(perturbed_clip(cfg), cfg)
    model = build_model(cfg, ParallelConfig())
    assert import_hf_state_dict(model, sd) == {"derived": []}
    assert _equal(export_hf_state_dict(model), sd) == []


def test_plain_clip_round_trips_and_gains_derived_extras(world):
    from fgclip_mega.checkpoint import export_hf_state_dict, import_hf_state_dict

    cfg = small_config()
    hf = perturbed_clip(cfg)
    sd = dict(hf.state_dict())
    model = build_model(cfg, ParallelConfig())
    report = import_hf_state_dict(model, hf)  # a module is accepted too
    assert sorted(report["derived"]) == sorted(
        [
            "text_model.embeddings.position_embedding_ori.weight",
            "text_model.embeddings.position_embedding_res.weight",
            "text_filip_projection.weight",
            "logit_scale_finegraind",
            "logit_scale_hardneg",
        ]
    )
    assert _equal(export_hf_state_dict(model, layout="clip"), sd) == []
    full = export_hf_state_dict(model)
    assert torch.equal(full["text_filip_projection.weight"], sd["text_projection.weight"])
    assert torch.equal(full["logit_scale_hardneg"], sd["logit_scale"])
    # The "clip" export loads strictly into transformers' CLIPModel.
    fresh = perturbed_clip(cfg, seed=9)
    fresh.load_state_dict(export_hf_state_dict(model, layout="clip"), strict=True)


def test_files_safetensors_torch_directory_and_sharded_index(world, tmp_path):
    from fgclip_mega.checkpoint import (
        export_hf_state_dict,
        import_hf_state_dict,
        load_state_dict,
        save_state_dict,
    )

    cfg = small_config()
    sd = fgclip_layout(perturbed_clip(cfg), cfg)
    save_state_dict(sd, tmp_path / "a" / "model.safetensors")
    save_state_dict(sd, tmp_path / "b.bin")
    keys = sorted(sd)
    half = len(keys) // 2
    shards = {"s1.safetensors": keys[:half], "s2.safetensors": keys[half:]}
    for name, part in shards.items():
        save_state_dict({k: sd[k] for k in part}, tmp_path / "c" / name)
    index = {"weight_map": {k: name for name, part in shards.items() for k in part}}
    (tmp_path / "c" / "model.safetensors.index.json").write_text(json.dumps(index))
    for source in (
        tmp_path / "a",
        tmp_path / "a" / "model.safetensors",
        tmp_path / "b.bin",
        tmp_path / "c",
    ):
        assert _equal(load_state_dict(source), sd) == [], source
        model = build_model(cfg, ParallelConfig())
        import_hf_state_dict(model, source)
        assert _equal(export_hf_state_dict(model), sd) == [], source
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_state_dict(tmp_path)


def test_position_id_buffers_are_ignored(world):
    from fgclip_mega.checkpoint import import_hf_state_dict

    cfg = small_config()
    sd = dict(perturbed_clip(cfg).state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    import_hf_state_dict(build_model(cfg, ParallelConfig()), sd)


def test_mismatched_checkpoints_name_the_key(world):
    from fgclip_mega.checkpoint import CheckpointError, import_hf_state_dict

    cfg = small_config()
    sd = dict(perturbed_clip(cfg).state_dict())
    model = build_model(cfg, ParallelConfig())

    missing = {k: v for k, v in sd.items() if k != "text_model.encoder.layers.1.mlp.fc2.bias"}
    with pytest.raises(CheckpointError, match=r"missing .*text_model\.encoder\.layers\.1\.mlp"):
        import_hf_state_dict(model, missing)

    extra = {**sd, "vision_model.encoder.layers.2.layer_norm1.weight": torch.ones(48)}
    with pytest.raises(CheckpointError, match=r"unexpected .*vision_model\.encoder\.layers\.2"):
        import_hf_state_dict(model, extra)

    bad = dict(sd)
    bad["vision_model.encoder.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 40)
    with pytest.raises(
        CheckpointError,
        match=r"layers\.0\.self_attn\.k_proj\.weight: checkpoint "
        r"shape \(48, 40\).* expects \(48, 48\)",
    ):
        import_hf_state_dict(model, bad)

    # A ViT-B/16 checkpoint into the small model: the first mismatching key is named.
    from tests.builders import b16_config

    with torch.device("meta"):
        from transformers import CLIPModel

        from fgclip_mega.checkpoint import clip_config

        b16 = CLIPModel(clip_config(b16_config())).state_dict()
    b16 = {
        k: torch.zeros(v.shape)
        for k, v in b16.items()
        if "layers." not in k or any(f"layers.{i}." in k for i in (0, 1))
    }
    with pytest.raises(
        CheckpointError, match=r"class_embedding: checkpoint shape \(768,\).*expects \(48,\)"
    ):
        import_hf_state_dict(model, b16)

    # A long table of the wrong length is a shape error on its own key.
    long = fgclip_layout(perturbed_clip(cfg), cfg)
    long["text_model.embeddings.position_embedding_res.weight"] = torch.zeros(200, 32)
    with pytest.raises(CheckpointError, match=r"position_embedding_res\.weight: checkpoint shape"):
        import_hf_state_dict(model, long)


def test_export_layout_is_checked(world):
    from fgclip_mega.checkpoint import export_hf_state_dict

    with pytest.raises(ValueError, match="layout"):
        export_hf_state_dict(build_model(small_config(), ParallelConfig()), layout="openclip")


def test_partial_fgclip_extras_are_refused_not_derived(world):
    """Issue 9: some FG-CLIP extras present and others missing is a broken FG-CLIP checkpoint,
    not a plain CLIP one: refused naming the missing keys (derivation is for plain CLIP only)."""
    from fgclip_mega.checkpoint import CheckpointError, import_hf_state_dict

    cfg = small_config()
    sd = fgclip_layout(perturbed_clip(cfg), cfg)
    res = "text_model.embeddings.position_embedding_res.weight"
    partial = {k: v for k, v in sd.items() if k not in (res, "logit_scale_hardneg")}
    model = build_model(cfg, ParallelConfig())
    before = export_state(model)
    with pytest.raises(
        CheckpointError, match=r"lacks \['logit_scale_hardneg', '[\w.]+position_embedding_res"
    ):
        import_hf_state_dict(model, partial)
    assert _equal(export_state(model), before) == []  # nothing was half-loaded


def export_state(model):
    from fgclip_mega.checkpoint import export_hf_state_dict

    return export_hf_state_dict(model)


def test_siglip_logit_bias_round_trips_and_mismatches_are_named(world):
    from fgclip_mega.checkpoint import CheckpointError, export_hf_state_dict, import_hf_state_dict

    cfg = small_config()
    biased = dataclasses.replace(cfg, logit_bias_init=-10.0)
    sd = fgclip_layout(perturbed_clip(cfg), cfg)
    sd_bias = {**sd, "logit_bias": torch.tensor(-7.25)}
    model = build_model(biased, ParallelConfig())
    assert import_hf_state_dict(model, sd_bias) == {"derived": []}
    assert model.logit_bias.item() == -7.25
    assert _equal(export_hf_state_dict(model), sd_bias) == []
    with pytest.raises(CheckpointError, match=r"logit_bias.*model\.logit_bias_init"):
        import_hf_state_dict(model, sd)  # the model has a bias, the checkpoint none
    with pytest.raises(CheckpointError, match=r"logit_bias.*model\.logit_bias_init"):
        import_hf_state_dict(build_model(cfg, ParallelConfig()), sd_bias)
    with pytest.raises(CheckpointError, match="logit_bias"):
        export_hf_state_dict(model, layout="clip")  # CLIPModel cannot hold the bias


def test_cli_with_unreadable_init_weights_fails_in_one_line(tmp_path):
    # Issue 9: `checkpoint.init_from=BAD` printed an 8-frame traceback.
    import os
    import subprocess
    import sys

    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not safetensors")
    cmd = [sys.executable, "-m", "fgclip_mega.train", "--preset", "tiny",
           f"checkpoint.init_from={bad}", f"train.output_dir={tmp_path / 'run'}",
           f"data.synthetic_dir={tmp_path / 'data'}", "model.vision.layers=1",
           "model.text.layers=1"]  # fmt: skip
    # A fresh world of one: not the torchrun variables this test process set for its own world.
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "cannot read weights" in errors[0]


def test_init_from_a_training_checkpoint_takes_weights_only(world, tmp_path):
    # FG-CLIP's stage 2 is a new run from stage-1 weights: init_from a training checkpoint
    # loads its parameters (any layout), not its Adam moments or schedule position, and
    # starts the region/hard-negative temperatures at the learnt global one.
    import dataclasses

    from fgclip_mega.checkpoint import training as ckpt
    from tests.builders import build_run, tiny_run_config

    src = build_run(world, tiny_run_config(tmp_path, "global"))
    with torch.no_grad():
        for p in src.model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the fresh init the new run also draws
        src.model.logit_scale.fill_(3.1)
    saver = ckpt.checkpointer(src.output_dir / "checkpoints", src.state, src.cfg.checkpoint)
    saver.save(7, src.model, src.optimizer, src.scheduler, src.loader, src.cfg.to_dict())
    saver.wait()

    cfg = tiny_run_config(tmp_path, "regional")
    cfg.checkpoint = dataclasses.replace(cfg.checkpoint, init_from=str(src.output_dir))
    new = build_run(world, cfg.validate())
    theirs = dict(src.model.named_parameters())
    for name, p in new.model.named_parameters():
        if name in ("logit_scale_finegraind", "logit_scale_hardneg"):
            assert float(p) == pytest.approx(3.1), name
        else:
            assert torch.equal(p, theirs[name]), name
    assert new.scheduler.num_steps == 0  # a fresh schedule and optimizer
    assert not new.optimizer.optimizer.state  # no Adam moments

    cfg.loss = dataclasses.replace(cfg.loss, stage2_logit_scale=4.0)
    assert float(build_run(world, cfg.validate()).model.logit_scale_hardneg) == 4.0
