"""Which kernels megatron-core's optimizer runs: the AdamW update and the main -> model copy.

Without apex / Transformer Engine, megatron-core builds a plain torch AdamW (no `fused`, no
`foreach`: torch then picks foreach on CUDA and a per-param Python loop on CPU) and copies the
fp32 main params into the bf16 model params with one `copy_` per parameter (its
`_multi_tensor_copy_this_to_that` falls back to a loop; the distributed optimizer always loops),
i.e. hundreds of tiny kernels per step on a GPU. Here:
  - AdamW: `fused` (one multi-tensor kernel per dtype/device group, step counters on the device)
    where the params live on CUDA, `foreach` elsewhere (bitwise the per-param update). apex /
    TE FusedAdam, when megatron picked one, are left alone.
  - main -> model: one `torch._foreach_copy_` over all params of an optimizer (a multi-tensor
    kernel on CUDA; fp32 -> bf16 casts included), bitwise what the per-param copies wrote.
"""

from __future__ import annotations

import types

import torch

ADAM_KERNELS = ("fused", "foreach")


def adam_kernel_for(device: torch.device | str) -> str:
    """'fused' on CUDA, 'foreach' elsewhere (the fused CPU kernel exists but is not needed)."""
    return "fused" if torch.device(device).type == "cuda" else "foreach"


def _inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _torch_adam(opt):
    inner = getattr(opt, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Adam | torch.optim.AdamW) else None


def select_adam_kernel(optimizer, kernel: str) -> None:
    """Sets every torch Adam(W) param group of a megatron optimizer to `kernel` and moves the
    per-param `step` counters where that kernel wants them (fused: a float32 tensor on the
    param's device; foreach: on the CPU, so the bias correction reads no device value)."""
    if kernel not in ADAM_KERNELS:
        raise ValueError(f"adam kernel must be one of {ADAM_KERNELS}, got {kernel!r}")
    fused = kernel == "fused"
    for opt in _inner_optimizers(optimizer):
        inner = _torch_adam(opt)
        if inner is None:
            continue
        for group in inner.param_groups:
            if group.get("capturable") or group.get("differentiable"):
                continue  # not ours to change (CUDA graphs / higher-order use)
            group["fused"] = fused
            group["foreach"] = not fused
            for p in group["params"]:
                step = inner.state.get(p, {}).get("step")
                if torch.is_tensor(step):
                    where = p.device if fused else torch.device("cpu")
                    inner.state[p]["step"] = step.to(where, torch.float32)
        if fused:
            # What torch's constructor sets for fused=True (grad scalers may pass found_inf).
            inner._step_supports_amp_scaling = True


def _main_to_model_pairs(opt) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """(model-side destinations, fp32 main sources) of one megatron optimizer, or None where
    its own copy must run (FSDP, precision-aware or fp8 params, stub optimizers)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    if isinstance(opt, DistributedOptimizer):
        if (
            opt.is_stub_optimizer
            or opt.ddp_config.use_megatron_fsdp
            or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8
            or opt.config.fp8_recipe is not None
        ):
            return None
        dst, src = [], []
        for mains, models in (
            (opt.shard_fp32_from_float16_groups, opt.model_float16_groups),
            (opt.shard_fp32_groups, opt.model_fp32_groups),
        ):
            for main_group, model_group in zip(mains, models, strict=True):
                for main, param in zip(main_group, model_group, strict=True):
                    # The updated shard goes into this rank's range of the bucket's param
                    # buffer, which the (overlapped) all-gather then spreads (as megatron does).
                    world = opt._get_model_param_range_map(param)["gbuf_world_in_bucket"]
                    gbuf, _, bucket = opt.model_param_gbuf_map[param]
                    buffer = opt.buffers[gbuf].buckets[bucket].param_data
                    dst.append(buffer.view(-1)[world.start : world.end])
                    src.append(main)
        return dst, src
    if isinstance(opt, Float16OptimizerWithFloat16Params):
        model_data, main_data = opt._get_model_and_main_params_data_float16()
        return model_data, main_data
    return None


def _foreach_copy_main_params_to_model_params(self) -> None:
    pairs = _main_to_model_pairs(self)
    if pairs is None:
        return type(self)._copy_main_params_to_model_params(self)
    dst, src = pairs
    if dst:
        torch._foreach_copy_(dst, src)


def use_foreach_param_copy(optimizer) -> None:
    """Replaces each megatron mixed-precision optimizer's main -> model copy (run after every
    step) by one `torch._foreach_copy_`."""
    for opt in _inner_optimizers(optimizer):
        if _main_to_model_pairs(opt) is not None:
            opt._copy_main_params_to_model_params = types.MethodType(
                _foreach_copy_main_params_to_model_params, opt
            )
