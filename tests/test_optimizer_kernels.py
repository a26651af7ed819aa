"""The optimizer's kernels (fgclip_mega/parallel/optim_kernels.py): fused AdamW where the params
are on CUDA, foreach elsewhere, and the main -> model param copy as one multi-tensor copy.

Gradients are written straight into megatron's fp32 grad buffers (main_grad), so every run sees
the same gradients and the reference is torch's own single-tensor AdamW on fp32 copies of the
initial weights. The CUDA path is imitated: a Runtime that says cuda makes build_optimizer pick
torch's fused AdamW, whose CPU kernel then runs the same steps here.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from fgclip_mega.config import OptimizerConfig, ParallelConfig
from fgclip_mega.runtime import Runtime

STEPS = 4
OPT = OptimizerConfig(lr=1e-2, min_lr=1e-2, weight_decay=0.1, eps=1e-8, clip_grad=1e6)


def _runtime(params_dtype: torch.dtype, device: str = "cpu") -> Runtime:
    return Runtime(
        device=torch.device(device),
        params_dtype=params_dtype,
        compute_dtype=torch.float32,
        attention="sdpa",
        contrastive="chunked",
        roi_align="cpu",
        decode="",
    )


class _Model(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        # Sizes that do not fill a bucket evenly; a 0-dim param like the logit scales.
        self.w1 = torch.nn.Parameter(torch.randn(24, 10, generator=g).to(dtype))
        self.b1 = torch.nn.Parameter(torch.randn(24, generator=g).to(dtype))
        self.w2 = torch.nn.Parameter(torch.randn(5, 24, generator=g).to(dtype))
        self.scale = torch.nn.Parameter(torch.tensor(0.7).to(dtype))


def _grads(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    shapes = {"w1": (24, 10), "b1": (24,), "w2": (5, 24), "scale": ()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def _build(params_dtype, distributed: bool, device: str = "cpu"):
    from fgclip_mega.parallel.wrap import build_optimizer, wrap_data_parallel

    pc = ParallelConfig(use_distributed_optimizer=distributed, overlap_grad_reduce=False)
    runtime = _runtime(params_dtype, device)
    model = _Model(params_dtype)
    ddp = wrap_data_parallel(model, pc, runtime)
    opt, _ = build_optimizer(ddp, OPT, pc, runtime, total_steps=100)
    return model, ddp, opt


def _train(model, ddp, opt) -> dict[str, torch.Tensor]:
    params = dict(model.named_parameters())
    for step in range(STEPS):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        for name, g in _grads(step).items():
            params[name].main_grad.copy_(g)
        ok, _, _ = opt.step()
        assert ok
    return {k: v.detach().clone() for k, v in params.items()}


def _reference(params_dtype) -> dict[str, torch.Tensor]:
    # torch's single-tensor AdamW (not the foreach or fused kernels under test) on fp32 masters.
    model = _Model(params_dtype)
    params = {k: v.detach().float().clone().requires_grad_() for k, v in model.named_parameters()}
    decay = [params["w1"], params["w2"]]
    no_decay = [params["b1"], params["scale"]]  # < 2 dims: no decay (wrap.skips_weight_decay)
    opt = torch.optim.AdamW(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=OPT.lr,
        betas=(OPT.beta1, OPT.beta2),
        eps=OPT.eps,
        weight_decay=OPT.weight_decay,
        foreach=False,
        fused=False,
    )
    for step in range(STEPS):
        for name, g in _grads(step).items():
            params[name].grad = g.clone()
        opt.step()
    return {k: v.detach().to(params_dtype) for k, v in params.items()}


def _adam_groups(opt) -> list[dict]:
    return [g for o in opt.chained_optimizers for g in o.optimizer.param_groups]


class _CountCopies(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in ("copy_", "_foreach_copy_"):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


CASES = [
    (torch.bfloat16, False),  # Float16OptimizerWithFloat16Params
    (torch.bfloat16, True),  # DistributedOptimizer, bf16 model params
    (torch.float32, True),  # DistributedOptimizer, fp32 model params (shard_fp32_groups)
]


@pytest.mark.parametrize("dtype,distributed", CASES, ids=["bf16", "bf16-distopt", "fp32-distopt"])
def test_adamw_steps_match_torch_and_the_copy_is_one_foreach_call(world, dtype, distributed):
    want = _reference(dtype)
    results = {}
    for device in ("cpu", "cuda"):  # "cuda": the Runtime says so; everything runs on the CPU
        model, ddp, opt = _build(dtype, distributed, device)
        groups = _adam_groups(opt)
        kernel = "fused" if device == "cuda" else "foreach"
        assert all(g["fused"] == (kernel == "fused") for g in groups), groups
        assert all(g["foreach"] == (kernel == "foreach") for g in groups), groups
        results[kernel] = got = _train(model, ddp, opt)
        for name, ref in want.items():
            if kernel == "foreach":  # measured: bitwise torch's single-tensor AdamW
                assert torch.equal(got[name], ref), name
            else:  # fused: fp32 main params within 6e-8 after 4 steps (measured)
                tol = (
                    dict(rtol=2**-8, atol=0)
                    if dtype == torch.bfloat16
                    else dict(rtol=1e-6, atol=1e-7)
                )
                torch.testing.assert_close(got[name], ref, **tol, msg=name)
        assert (got["w1"].float() - _Model(dtype).w1.float()).abs().max() > 1e-2  # it moved

        # The main -> model copy: one _foreach_copy_ per megatron optimizer, no per-param copy_.
        inner = opt.chained_optimizers
        with _CountCopies() as counter:
            for o in inner:
                o._copy_main_params_to_model_params()
        assert counter.calls == {"_foreach_copy_": len(inner)}, counter.calls
    # The previous implementation (foreach AdamW, megatron's per-param copy_) gives bitwise the
    # same params as the CPU path now.
    model, ddp, opt = _build(dtype, distributed, "cpu")
    for o in opt.chained_optimizers:
        del o._copy_main_params_to_model_params  # back to megatron's own method
    with _CountCopies() as counter:
        opt.chained_optimizers[0]._copy_main_params_to_model_params()
    assert counter.calls.get("copy_", 0) >= len(want), counter.calls  # the old path loops
    old = _train(model, ddp, opt)
    for name in want:
        assert torch.equal(old[name], results["foreach"][name]), name


def test_loaded_cpu_state_is_moved_for_the_fused_kernel(world):
    # A checkpoint written by a CPU run brings foreach groups and CPU step counters; on a GPU
    # (imitated: the param device is asked) the kernel switches to fused and the counters follow.
    from fgclip_mega.parallel.optim_kernels import select_adam_kernel

    model, ddp, opt = _build(torch.bfloat16, False)
    _train(model, ddp, opt)
    inner = opt.chained_optimizers[0].optimizer
    steps = [s["step"] for s in inner.state.values()]
    assert steps and all(s.device.type == "cpu" for s in steps)
    select_adam_kernel(opt, "fused")
    assert all(g["fused"] and not g["foreach"] for g in inner.param_groups)
    assert all(s["step"].dtype == torch.float32 for s in inner.state.values())
    assert [s["step"].item() for s in inner.state.values()] == [float(STEPS)] * len(steps)
    with pytest.raises(ValueError, match="adam kernel"):
        select_adam_kernel(opt, "apex")


def test_runtime_device_picks_the_kernel():
    from fgclip_mega.parallel.optim_kernels import adam_kernel_for

    assert adam_kernel_for(torch.device("cuda", 3)) == "fused"
    assert adam_kernel_for("cpu") == "foreach"
