"""A global-stage (stage 1) step with megatron DDP's overlapped gradient reduction: the region
and hard-negative temperatures take no part in stage 1, yet every parameter of a DDP bucket must
receive a gradient for the bucket's reduction to start (on CUDA overlap is the default, so every
stage-1 run on a GPU stopped at step 2: "Communication call has not been issued for this
bucket (65/67 params have grad available)"); so did loss.learn_temperatures=false, whose scales
are detached. The objective connects the temperatures it does not train with a zero term: their
gradient is exactly 0, their values do not move."""

from __future__ import annotations

import pytest
import torch

from tests.builders import build_run, tiny_run_config


@pytest.mark.parametrize("stage, learn", [("global", True), ("regional", False)])
def test_steps_with_overlapped_grad_reduce_and_unused_temperatures(world, tmp_path, stage, learn):
    """Stage 1 (two scales unused) and loss.learn_temperatures=false (all detached)."""
    from fgclip_mega.train.step import train_step

    cfg = tiny_run_config(tmp_path, stage)
    cfg.parallel.overlap_grad_reduce = True
    cfg.loss.learn_temperatures = learn
    run = build_run(world, cfg)
    before = {n: p.detach().clone() for n, p in run.model.temperatures().items()}
    for step in (1, 2, 3):
        out = train_step(run, next(run.loader), step)
        assert torch.isfinite(out.values).all()
    after = run.model.temperatures()
    frozen = ("logit_scale_finegraind", "logit_scale_hardneg") if learn else tuple(before)
    for name in frozen:
        assert torch.equal(after[name].detach(), before[name]), name
    assert torch.equal(after["logit_scale"].detach(), before["logit_scale"]) != learn
