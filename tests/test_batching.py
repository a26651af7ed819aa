"""Global batch -> micro-batch x DP x accumulation (train/batching.py, Config.validate) and the
memory report of `python -m fgclip_mega.env`."""

from __future__ import annotations

import pytest

from fgclip_mega.config import ConfigError
from fgclip_mega.presets import load_config, preset, tiny
from fgclip_mega.profiling.memory import memory_estimate
from fgclip_mega.train.batching import plan_batch, resolve_batch

GB80 = 80e9


def test_bad_batch_settings_name_the_field():
    for pair, field in (
        ("train.global_batch_size=-1", "train.global_batch_size"),
        ("train.device_memory_gb=-2", "train.device_memory_gb"),
        ("data.micro_batch_size=-1", "data.micro_batch_size"),
    ):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            load_config("tiny", None, [pair])
    for global_batch, tp, world, field in (
        (33, 1, 2, "train.global_batch_size"),  # 33 samples over 2 data-parallel ranks
        (48, 1, 2, "data.micro_batch_size"),  # 48 = 16 x 2 x 1.5 accumulation steps
        (48, 2, 4, "data.micro_batch_size"),  # DP = world / TP = 2
    ):
        cfg = tiny()
        cfg.train.global_batch_size = global_batch
        cfg.parallel.tensor_parallel_size = tp
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            cfg.validate(world_size=world)
    cfg = tiny()
    cfg.train.global_batch_size = 64
    cfg.validate(world_size=2)  # 16 x 2 x 2
    cfg.data.micro_batch_size = 0
    cfg.validate(world_size=2)  # auto


def test_explicit_micro_batch_gives_the_accumulation_or_names_the_field():
    cfg = tiny()
    cfg.train.global_batch_size = 128
    plan = plan_batch(cfg, 2, GB80)
    assert (plan.micro_batch_size, plan.accumulation, plan.global_batch_size) == (16, 4, 128)
    cfg.data.micro_batch_size = 24  # 64 per rank is not a multiple of 24
    with pytest.raises(ConfigError, match=r"data\.micro_batch_size"):
        plan_batch(cfg, 2, GB80)
    with pytest.raises(ConfigError, match=r"train\.global_batch_size"):
        plan_batch(cfg, 3, GB80)


def test_tiny_keeps_one_micro_batch_of_16_per_step():
    cfg = tiny().validate(world_size=2)
    resolved, plan = resolve_batch(cfg, 2)
    assert resolved is cfg and (plan.micro_batch_size, plan.accumulation) == (16, 1)
    assert plan.global_batch_size == 32


@pytest.mark.parametrize("name", ["fgclip_vit_b16", "fgclip_vit_l14_336"])
@pytest.mark.parametrize("stage", ["global", "regional"])
def test_auto_micro_batch_is_the_largest_divisor_that_fits(name, stage):
    cfg = preset(name)
    plan = plan_batch(cfg, 64, GB80, stage=stage)
    assert plan.global_batch_size == 32768 and plan.fits
    m = plan.micro_batch_size
    assert m >= 16, "the GPU presets are sized from memory, not a fixed micro-batch of 8"
    if m < 512:  # the next divisor of the rank's 512 samples would not fit
        bigger = memory_estimate(cfg, micro_batch_size=2 * m, accumulation=256 // m,
                                 dp_size=64, stage=stage)  # fmt: skip
        assert bigger.total > GB80
    # Half the memory never gives a larger micro-batch.
    assert plan_batch(cfg, 64, GB80 / 2, stage=stage).micro_batch_size <= m


def test_l14_stage2_needs_checkpointing_to_reach_a_large_micro_batch():
    cfg = preset("fgclip_vit_l14_336")
    assert cfg.parallel.activation_checkpointing
    with_ckpt = plan_batch(cfg, 64, GB80, stage="regional")
    cfg.parallel.activation_checkpointing = False
    without = plan_batch(cfg, 64, GB80, stage="regional")
    assert with_ckpt.micro_batch_size >= 4 * without.micro_batch_size


def test_auto_without_any_fit_names_the_field_and_the_remedy():
    cfg = preset("fgclip_vit_l14_336")
    with pytest.raises(ConfigError, match=r"data\.micro_batch_size.*activation_checkpointing"):
        plan_batch(cfg, 64, 4e9, stage="regional")


def test_env_prints_the_memory_plan_of_a_preset(capsys):
    from fgclip_mega import env

    plans = env.memory_plans("fgclip_vit_b16", 64, 80.0)
    stage1 = plans["global"]["preset"]
    assert (stage1["micro_batch_size"], stage1["accumulation"]) == (512, 1)
    stage2 = plans["regional"]["preset"]
    assert (stage2["micro_batch_size"], stage2["accumulation"]) == (64, 8)
    assert {"parameters", "gradients", "optimizer", "activations", "loss", "allowance"} <= set(
        stage1["parts_gib"]
    )
    env._print_memory("fgclip_vit_b16", plans)
    out = capsys.readouterr().out
    assert "global batch 32768 = micro-batch 512 x DP 64 x accumulation 1" in out
    assert "global batch 32768 = micro-batch 64 x DP 64 x accumulation 8" in out
    assert "stage regional" in out and "activations of one micro-batch" in out
