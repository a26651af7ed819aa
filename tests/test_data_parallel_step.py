"""megatron-core DDP + (distributed) optimizer steps at TP x DP equal one-process torch AdamW,
also with the image tower's own learning rate (optim.vision_lr_mult)."""

import dataclasses
import math

import pytest
import torch

from fgclip_mega.config import Config, OptimizerConfig, ParallelConfig, PrecisionConfig
from tests.distributed import run_distributed

D_IN, D_HID, D_OUT, LOCAL_B, STEPS = 6, 8, 4, 4, 3
OPT = OptimizerConfig(lr=5e-2, min_lr=1e-3, weight_decay=0.1, warmup_steps=1, clip_grad=0.5)


def _reference_params():
    torch.manual_seed(0)
    return {
        "w1": torch.randn(D_HID, D_IN),
        "b1": torch.randn(D_HID),
        "w2": torch.randn(D_OUT, D_HID),
        "b2": torch.randn(D_OUT),
        "scale": torch.tensor(0.7),
    }


def _batches(dp_size: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(dp_size * LOCAL_B, D_IN, generator=g) for _ in range(STEPS)]


def _lr(step: int) -> float:
    # megatron's OptimizerParamScheduler: linear warm-up, then cosine to min_lr.
    if step < OPT.warmup_steps:
        return OPT.lr * step / OPT.warmup_steps
    ratio = (step - OPT.warmup_steps) / (STEPS - OPT.warmup_steps)
    return OPT.min_lr + (OPT.lr - OPT.min_lr) * 0.5 * (math.cos(math.pi * ratio) + 1)


def _forward(p, x):
    h = torch.relu(x @ p["w1"].T + p["b1"])
    return (h @ p["w2"].T + p["b2"]) * p["scale"]


def _single_process_run(dp_size: int, vision_lr_mult: float = 1.0) -> dict:
    """The first layer (w1, b1) plays the image tower: its rate is vision_lr_mult x the schedule
    (peak and final rate both scaled, so the whole cosine is)."""
    params = {k: v.clone().requires_grad_(True) for k, v in _reference_params().items()}
    opt = torch.optim.AdamW(
        [
            {"params": [params["w1"]], "weight_decay": OPT.weight_decay, "mult": vision_lr_mult},
            {"params": [params["w2"]], "weight_decay": OPT.weight_decay, "mult": 1.0},
            {"params": [params["b1"]], "weight_decay": 0.0, "mult": vision_lr_mult},
            {"params": [params["b2"], params["scale"]], "weight_decay": 0.0, "mult": 1.0},
        ],
        lr=OPT.lr,
        betas=(OPT.beta1, OPT.beta2),
        eps=OPT.eps,
    )
    for step, x in enumerate(_batches(dp_size)):
        for group in opt.param_groups:
            group["lr"] = _lr(step) * group["mult"]
        opt.zero_grad()
        _forward(params, x).square().mean().backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), OPT.clip_grad)
        opt.step()
    return {k: v.detach() for k, v in params.items()}


def _sharded_run(
    tp: int, distributed_optimizer: bool, overlap: bool, vision_lr_mult: float = 1.0
) -> dict:
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from fgclip_mega.parallel import init_parallel
    from fgclip_mega.parallel.wrap import (
        build_optimizer,
        megatron_config,
        sync_params,
        wrap_data_parallel,
    )

    pc = ParallelConfig(
        tensor_parallel_size=tp,
        use_distributed_optimizer=distributed_optimizer,
        overlap_grad_reduce=overlap,
    )
    st = init_parallel(Config(parallel=pc, precision=PrecisionConfig("fp32", "fp32")), seed=3,
                       with_decode=False)  # fmt: skip
    runtime = st.runtime
    cfg = megatron_config(tp, False, runtime.params_dtype)
    zeros = torch.nn.init.zeros_

    class TwoLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            # Named as FGCLIPModel's image tower, which optim.vision_lr_mult selects by name.
            self.vision = ColumnParallelLinear(
                D_IN, D_HID, config=cfg, init_method=zeros, bias=True, gather_output=False
            )
            self.row = RowParallelLinear(
                D_HID,
                D_OUT,
                config=cfg,
                init_method=zeros,
                bias=True,
                input_is_parallel=True,
                skip_bias_add=False,
            )
            self.scale = torch.nn.Parameter(torch.tensor(0.0))

        def forward(self, x):
            h, _ = self.vision(x)
            y, _ = self.row(torch.relu(h))
            return y * self.scale

    model = TwoLayer()
    ref = _reference_params()
    r, s = st.tp_rank, D_HID // tp
    with torch.no_grad():
        model.vision.weight.copy_(ref["w1"][r * s : (r + 1) * s])
        model.vision.bias.copy_(ref["b1"][r * s : (r + 1) * s])
        model.row.weight.copy_(ref["w2"][:, r * s : (r + 1) * s])
        model.row.bias.copy_(ref["b2"])
        model.scale.copy_(ref["scale"])
    ddp = wrap_data_parallel(model, pc, runtime)
    optim = dataclasses.replace(OPT, vision_lr_mult=vision_lr_mult)
    opt, sched = build_optimizer(ddp, optim, pc, runtime, total_steps=STEPS)
    for x in _batches(st.dp_size):
        local = x[st.dp_rank * LOCAL_B : (st.dp_rank + 1) * LOCAL_B]
        ddp.zero_grad_buffer()
        opt.zero_grad()
        ddp(local).square().mean().backward()
        ddp.finish_grad_sync()
        ok, _, _ = opt.step()
        assert ok
        sched.step(1)
    sync_params(ddp)  # overlapped param all-gather: params are complete only after this
    return {
        "tp_rank": r,
        "shard": s,
        "w1": model.vision.weight.detach().clone(),
        "b1": model.vision.bias.detach().clone(),
        "w2": model.row.weight.detach().clone(),
        "b2": model.row.bias.detach().clone(),
        "scale": model.scale.detach().clone(),
    }


def _check(results, dp_size, vision_lr_mult: float = 1.0):
    want = _single_process_run(dp_size, vision_lr_mult)
    for res in results:
        r, s = res["tp_rank"], res["shard"]
        torch.testing.assert_close(res["w1"], want["w1"][r * s : (r + 1) * s], atol=1e-5, rtol=0)
        torch.testing.assert_close(res["b1"], want["b1"][r * s : (r + 1) * s], atol=1e-5, rtol=0)
        torch.testing.assert_close(res["w2"], want["w2"][:, r * s : (r + 1) * s], atol=1e-5, rtol=0)
        torch.testing.assert_close(res["b2"], want["b2"], atol=1e-5, rtol=0)
        torch.testing.assert_close(res["scale"], want["scale"], atol=1e-5, rtol=0)
    # The steps moved the weights: the comparison is not between two untouched copies.
    assert (want["w1"] - _reference_params()["w1"]).abs().max() > 1e-2


def test_dp2_distributed_optimizer_overlapped_matches_adamw():
    _check(run_distributed(_sharded_run, 2, 1, True, True), dp_size=2)


def test_dp2_vision_lr_mult_matches_adamw_with_a_slower_first_layer():
    results = run_distributed(_sharded_run, 2, 1, True, False, 0.25)
    _check(results, dp_size=2, vision_lr_mult=0.25)
    # The multiple changed the result: it is not the default run again.
    default = _single_process_run(2)
    assert (results[0]["w1"] - default["w1"]).abs().max() > 1e-3


@pytest.mark.slow
def test_tp2_dp2_distributed_optimizer_matches_adamw():
    _check(run_distributed(_sharded_run, 4, 2, True, False), dp_size=2)
