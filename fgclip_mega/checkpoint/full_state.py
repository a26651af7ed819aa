"""Layout-free training state: full (unsharded) parameters and optimizer moments by name.

A saved state holds every parameter and every Adam tensor as the full tensor of the single-GPU
model, keyed by parameter name, so any TP x DP layout can load it: each rank slices its TP shard
with megatron's partition attributes (`hf.shard`) and, under the distributed optimizer, its DP
range of the flattened shard. Gathering is exact (bit copies, no arithmetic), so a state saved and
loaded at any layouts is bitwise the state that was saved.

Why full tensors on one rank: at our scale (a ViT-L/14 FG-CLIP is ~430M params, ~7 GB with fp32
Adam state) one host holds it easily and one file per kind is the simplest thing that can be
verified and resharded. A 10B-parameter model (~160 GB of state) would need every rank to write
its own slice in parallel in a layout-free format (torch.distributed.checkpoint or megatron's
dist_checkpointing with `fully_reshardable`), which reshards on load without a full copy anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from fgclip_mega.checkpoint.errors import CheckpointError
from fgclip_mega.checkpoint.hf import full_shape, shard, unshard


@dataclass
class _Slot:
    """Where a model parameter's optimizer state lives on this rank."""

    inner: torch.optim.Optimizer  # the torch optimizer holding the state
    main: torch.Tensor  # fp32 main param (or this rank's flat range of it)
    start: int  # range of the flattened (TP-local) parameter that `main` covers
    end: int


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _slots(optimizer, model: torch.nn.Module) -> dict[str, _Slot]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    names = {id(p): n for n, p in model.named_parameters()}
    slots: dict[str, _Slot] = {}
    for opt in _optimizers(optimizer):
        inner = opt.optimizer
        if isinstance(opt, DistributedOptimizer):
            if opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
                raise NotImplementedError("precision-aware optimizer state is not supported")
            for p, (gi, go) in opt.model_param_group_index_map.items():
                r = opt._get_model_param_range_map(p)["param"]
                main = inner.param_groups[gi]["params"][go]
                slots[names[id(p)]] = _Slot(inner, main, r.start, r.end)
        elif isinstance(opt, Float16OptimizerWithFloat16Params):
            groups = zip(opt.float16_groups, opt.fp32_from_float16_groups, strict=True)
            pairs = [pr for model_g, main_g in groups for pr in zip(model_g, main_g, strict=True)]
            pairs += [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
            for p, main in pairs:
                slots[names[id(p)]] = _Slot(inner, main, 0, p.numel())
        else:  # FP32Optimizer: the model params are the optimizer's params
            for g in inner.param_groups:
                for p in g["params"]:
                    slots[names[id(p)]] = _Slot(inner, p, 0, p.numel())
    return slots


def _is_distributed(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return any(isinstance(o, DistributedOptimizer) for o in _optimizers(optimizer))


def _reduce_bits(flat: torch.Tensor, group) -> None:
    # Disjoint ranges summed over the DP group: as integers, so the copies are bit-exact
    # (a float sum would turn -0.0 into +0.0).
    ints = {4: torch.int32, 2: torch.int16, 8: torch.int64}[flat.element_size()]
    dist.all_reduce(flat.view(ints), group=group)


@torch.no_grad()
def gather_model(model: torch.nn.Module, tp_group) -> dict[str, torch.Tensor]:
    """{name: full CPU tensor}; a collective over the TP group."""
    return {
        name: unshard(p.detach(), p, tp_group).to("cpu", copy=True)
        for name, p in model.named_parameters()
    }


@torch.no_grad()
def gather_optimizer(optimizer, model: torch.nn.Module, tp_group, dp_group) -> dict:
    """{"tensors": {name: {key: full tensor}}, "scalars": {name: {key: value}}, "grad_scalers"};
    a collective over TP and DP. Keys are the main param ("param") and the torch optimizer's
    per-param state (exp_avg, exp_avg_sq; 'step' is a scalar)."""
    params = dict(model.named_parameters())
    slots = _slots(optimizer, model)
    distributed = _is_distributed(optimizer) and dp_group.size() > 1
    # Which state keys exist: the same on every rank once any rank has stepped.
    local_keys, scalars = set(), {}
    for name, slot in slots.items():
        for key, value in slot.inner.state.get(slot.main, {}).items():
            # 'step' is a per-param counter (0-dim, like a 0-dim param's moments).
            if key != "step" and torch.is_tensor(value) and value.numel() == slot.main.numel():
                local_keys.add(key)
            else:
                scalars.setdefault(name, {})[key] = (
                    value.detach().to("cpu", copy=True) if torch.is_tensor(value) else value
                )
    if distributed:
        every = [None] * dp_group.size()
        dist.all_gather_object(every, (sorted(local_keys), scalars), group=dp_group)
        local_keys = set().union(*(set(k) for k, _ in every))
        scalars = {}
        for _, s in every:
            for name, values in s.items():
                scalars.setdefault(name, {}).update(values)
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in params}
    offsets, total = {}, 0
    for name, p in params.items():
        offsets[name] = total
        total += p.numel()
    for key in ["param", *sorted(local_keys)]:
        dtype = next(iter(slots.values())).main.dtype if slots else torch.float32
        flat = torch.zeros(total, dtype=dtype)
        for name, slot in slots.items():
            value = slot.main if key == "param" else slot.inner.state.get(slot.main, {}).get(key)
            if value is not None:
                o = offsets[name]
                flat[o + slot.start : o + slot.end] = value.detach().reshape(-1).cpu()
        if distributed:
            _reduce_bits(flat, dp_group)
        for name, p in params.items():
            local = flat[offsets[name] : offsets[name] + p.numel()].view(p.shape)
            tensors[name][key] = unshard(local, p, tp_group).clone()
    grad_scalers = [
        o.grad_scaler.state_dict() if getattr(o, "grad_scaler", None) is not None else None
        for o in _optimizers(optimizer)
    ]
    return {"tensors": tensors, "scalars": scalars, "grad_scalers": grad_scalers}


def _check_names(saved: dict, model: torch.nn.Module, what: str, where: str) -> None:
    names = {n for n, _ in model.named_parameters()}
    missing, unexpected = sorted(names - set(saved)), sorted(set(saved) - names)
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: {what} does not match the model: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]} (different model config?)"
        )


def _check_shape(name: str, full: torch.Tensor, p: torch.Tensor, tp_size: int, where: str):
    if tuple(full.shape) != full_shape(p, tp_size):
        raise CheckpointError(
            f"{where}: {name} has shape {tuple(full.shape)}, the model's full parameter is "
            f"{full_shape(p, tp_size)} (different model config?)"
        )


@torch.no_grad()
def load_model(model: torch.nn.Module, saved: dict, tp_rank: int, tp_size: int, where: str):
    _check_names(saved, model, "the model state", where)
    for name, p in model.named_parameters():
        _check_shape(name, saved[name], p, tp_size, where)
        p.copy_(shard(saved[name], p, tp_rank, tp_size).to(p.dtype))


@torch.no_grad()
def load_optimizer(
    optimizer, model: torch.nn.Module, saved: dict, tp_rank: int, tp_size: int, where: str
) -> None:
    """Each rank takes its TP shard and DP range of every saved tensor."""
    _check_names(saved["tensors"], model, "the optimizer state", where)
    params = dict(model.named_parameters())
    for name, slot in _slots(optimizer, model).items():
        p = params[name]
        state = slot.inner.state.setdefault(slot.main, {})
        for key, full in saved["tensors"][name].items():
            _check_shape(f"{name}.{key}", full, p, tp_size, where)
            local = shard(full, p, tp_rank, tp_size).reshape(-1)[slot.start : slot.end]
            local = local.view(slot.main.shape).to(slot.main.dtype)
            if key == "param":
                slot.main.copy_(local)
            else:
                state[key] = local.clone().to(slot.main.device)
        for key, value in saved["scalars"].get(name, {}).items():
            # One tensor per param: torch's AdamW increments `step` in place.
            state[key] = value.clone().to(slot.main.device) if torch.is_tensor(value) else value
    for opt, scaler in zip(_optimizers(optimizer), saved["grad_scalers"], strict=True):
        if scaler is not None and getattr(opt, "grad_scaler", None) is not None:
            opt.grad_scaler.load_state_dict(scaler)
