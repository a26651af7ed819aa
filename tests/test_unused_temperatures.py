"""A global-stage (stage 1) step with megatron DDP's overlapped gradient reduction: the region
and hard-negative temperatures take no part in stage 1, yet every parameter of a DDP bucket must
receive a gradient for the bucket's reduction to start (on CUDA overlap is the default, so every
stage-1 run on a GPU stopped at step 2: "Communication call has not been issued for this
bucket (65/67 params have grad available)"). The objective connects the temperatures it does not
use with a zero term: their gradient is exactly 0, their values do not move."""

from __future__ import annotations

import torch

from tests.builders import build_run, tiny_run_config


def test_global_stage_steps_with_overlapped_grad_reduce(world, tmp_path):
    from fgclip_mega.train.step import train_step

    cfg = tiny_run_config(tmp_path, "global")
    cfg.parallel.overlap_grad_reduce = True
    run = build_run(world, cfg)
    before = {n: p.detach().clone() for n, p in run.model.temperatures().items()}
    for step in (1, 2, 3):
        out = train_step(run, next(run.loader), step)
        assert torch.isfinite(out.values).all()
    after = run.model.temperatures()
    for name in ("logit_scale_finegraind", "logit_scale_hardneg"):
        assert torch.equal(after[name].detach(), before[name]), name
    assert not torch.equal(after["logit_scale"].detach(), before["logit_scale"])
