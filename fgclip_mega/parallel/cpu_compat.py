"""The one place where megatron-core is made to run without CUDA (gloo on CPU).

megatron-core assumes CUDA in a handful of places (measured on 0.16.1, see shared FACTS):
1. `torch.cuda.current_device()` is used as an allocation device;
2. the model-parallel RNG tracker saves/restores CUDA generator states;
3. `device="cuda"` literals (causal masks, DDP buffers, grad clipping, grad scaler, optimizer);
4. `param.type() == 'torch.cuda.FloatTensor'` checks in the optimizers.
`enable()` fixes (1, 2) by routing the CUDA RNG and device queries to the CPU generator and
device, and (3, 4) with a TorchFunctionMode that rewrites CUDA devices to CPU, makes
`Tensor.cuda()` a no-op and reports CPU float tensors under their CUDA type names. It is
enabled only when CUDA is absent (by `fgclip_mega.parallel.init_parallel`); nothing else in the
code base special-cases CPU for megatron-core.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_state: dict[str, Any] = {}


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int device means a CUDA ordinal to torch factories.
    return isinstance(device, int) and not isinstance(device, bool)


# Functions whose calls the mode changes; every other call goes straight through (the fast path:
# the mode sees every torch call, ~2,600 per tiny step, most of them with no kwargs).
_SPECIAL = frozenset({torch.Tensor.cuda, torch.Tensor.type, torch.Tensor.to})


class CudaAsCpuMode(TorchFunctionMode):
    """Rewrites CUDA placements to CPU for every torch call made while it is active."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not kwargs:
            if func not in _SPECIAL:
                return func(*args)
            kwargs = {}
        elif "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = {**kwargs, "device": _CPU}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            # torch.FloatTensor -> torch.cuda.FloatTensor, as megatron's optimizer checks expect.
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


def _pop_if_top() -> bool:
    """Takes the mode off torch's function-mode stack if it is on top (the usual case; under
    another mode it stays, which is only slower)."""
    mode = _state.get("mode")
    n = torch._C._len_torch_function_stack()
    if mode is None or n == 0 or torch._C._get_function_stack_at(n - 1) is not mode:
        return False
    torch._C._pop_torch_function_stack()
    return True


def _push_back(popped: bool) -> None:
    if popped and _state:
        torch._C._push_on_torch_function_stack(_state["mode"])


@contextlib.contextmanager
def suspended():
    """Runs CUDA-free code without the mode. Its cost is not only its own call per torch
    function: while any mode is active, every `torch.nn.functional` call also takes torch's
    Python `handle_torch_function` path. Only for code that never names a CUDA device (megatron's
    tensor-parallel layers allocate through `torch.cuda.current_device()`, which `enable()`
    patches without the mode)."""
    popped = _pop_if_top()
    try:
        yield
    finally:
        _push_back(popped)


def run_forward_without_mode(module: torch.nn.Module) -> None:
    """Every forward of `module` runs `suspended()` (hooks; the mode comes back also when the
    forward raises). For the model's towers: megatron layers and our own code, no CUDA names."""
    popped: list[bool] = []

    def pre(_module, _args):
        popped.append(_pop_if_top())

    def post(_module, _args, _out):
        _push_back(popped.pop())

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(post, always_call=True)


def _cpu_get_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed: int) -> None:
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which would recurse here.
    torch.default_generator.manual_seed(seed)


def _cpu_autocast_function(fn_class) -> dict:
    """megatron's linear autograd Functions are decorated with torch.amp.custom_fwd/custom_bwd
    for device 'cuda': on a GPU the backward re-enters the forward's autocast, on CPU it ran
    outside CPU autocast (a bf16 grad times an fp32 weight fails). Record the CPU autocast state
    in forward and re-enter it in backward, as custom_bwd does on CUDA."""
    forward, backward = fn_class.__dict__["forward"], fn_class.__dict__["backward"]

    def cpu_forward(ctx, *args, **kwargs):
        ctx._fgclip_cpu_autocast = (
            torch.is_autocast_enabled("cpu"),
            torch.get_autocast_dtype("cpu"),
        )
        with suspended():  # megatron's linear names no CUDA device
            return forward.__func__(ctx, *args, **kwargs)

    def cpu_backward(ctx, *grads):
        enabled, dtype = ctx._fgclip_cpu_autocast
        with suspended():
            if not enabled and not torch.is_autocast_enabled("cpu"):
                return backward.__func__(ctx, *grads)  # fp32: nothing to re-enter
            with torch.autocast("cpu", dtype=dtype, enabled=enabled):
                return backward.__func__(ctx, *grads)

    fn_class.forward, fn_class.backward = staticmethod(cpu_forward), staticmethod(cpu_backward)
    return {(fn_class, "forward"): forward, (fn_class, "backward"): backward}


def is_enabled() -> bool:
    return bool(_state)


def enable() -> None:
    """Idempotent; call only when `torch.cuda.is_available()` is False."""
    if _state:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat.enable() is for machines without CUDA")
    from megatron.core.tensor_parallel import random as mp_random

    patches = {
        (torch.cuda, "current_device"): lambda: _CPU,
        (torch.cuda, "synchronize"): lambda *a, **k: None,
        (torch.cuda, "get_rng_state"): _cpu_get_rng_state,
        (torch.cuda, "set_rng_state"): _cpu_set_rng_state,
        (torch.cuda, "manual_seed"): _cpu_manual_seed,
        (mp_random, "_get_cuda_rng_state"): _cpu_get_rng_state,
        (mp_random, "_set_cuda_rng_state"): _cpu_set_rng_state,
    }
    originals = {key: getattr(*key) for key in patches}
    for (module, name), replacement in patches.items():
        setattr(module, name, replacement)
    from megatron.core.tensor_parallel import layers as mp_layers

    for fn_class in (
        mp_layers.LinearWithGradAccumulationAndAsyncCommunication,
        mp_layers.LinearWithFrozenWeight,
    ):
        originals.update(_cpu_autocast_function(fn_class))
    # The tracker's fork() swaps the CPU generator state in and out on every dropout; on CPU
    # that is exactly the intended behaviour, so its "CPU RNG state changed" warning is noise.
    logging.getLogger("megatron.core.tensor_parallel.random").setLevel(logging.ERROR)
    mode = CudaAsCpuMode()
    mode.__enter__()
    _state.update(originals=originals, mode=mode)


def disable() -> None:
    if not _state:
        return
    _state["mode"].__exit__(None, None, None)
    for (module, name), original in _state["originals"].items():
        setattr(module, name, original)
    _state.clear()
