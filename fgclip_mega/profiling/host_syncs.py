"""Counting host syncs: what would make the host wait for a GPU, counted on any device.

A step's budget (tests/test_host_syncs.py) and `run/bench_step.py` use it.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops whose result (a Python scalar, or a shape) depends on tensor values: on a GPU each one
# waits for the device.
_SCALAR_READS = {_aten._local_scalar_dense, _aten.is_nonzero, _aten.equal}
_DATA_DEPENDENT = {
    _aten.nonzero,
    _aten.masked_select,
    _aten._unique,
    _aten._unique2,
    _aten.unique_dim,
    _aten.unique_consecutive,
}
# Python-level reads that never reach the dispatcher for a CPU tensor (tolist, numpy read the
# memory directly); any of them in the step would be a device-to-host copy on a GPU.
_HOST_METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}


def _is_bool_index(indices) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ()
    )


class HostSyncCounter:
    """Counts what would make the host wait for the device while it is active.

    Counted: scalar reads (`.item()`, `bool()`, `float()`, `torch.equal`), ops with a
    data-dependent output shape (nonzero, boolean-mask indexing and assignment, masked_select,
    unique, repeat_interleave without output_size), copies from a non-CPU tensor to the CPU, and
    `Tensor.tolist/numpy/cpu` calls. On a CPU-only machine every tensor is on the CPU, so two
    exemptions say which reads would not touch a device on a GPU:
    - `host_tensors`: tensors that live on the host on a GPU too (torch Adam's `step` counters);
    - `cpu_only`: (path suffix, function name) of code that runs only for CPU tensors and takes a
      sync-free branch for device tensors (e.g. a token check that uses `_assert_async` on GPU).
    `events` lists (op, call site) per counted sync, for error messages.
    """

    def __init__(self, host_tensors=(), cpu_only: tuple[tuple[str, str], ...] = ()):
        self._host = {id(t) for t in host_tensors}
        self._cpu_only = tuple(cpu_only)
        self.events: list[tuple[str, str]] = []
        self.exempt: list[tuple[str, str]] = []
        counter = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if counter._is_sync(func, args, kwargs):
                    counter._record(str(func), args)
                return func(*args, **kwargs)

        class _Function(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in _HOST_METHODS:
                    counter._record(f"Tensor.{func.__name__}", args)
                return func(*args, **(kwargs or {}))

        self._modes = (_Function(), _Dispatch())

    @property
    def count(self) -> int:
        return len(self.events)

    def _is_sync(self, func, args, kwargs) -> bool:
        packet = func._overloadpacket
        if packet in _SCALAR_READS or packet in _DATA_DEPENDENT:
            return True
        if packet is _aten.repeat_interleave:
            return kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor)
        if packet in (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_):
            return _is_bool_index(args[1])
        if packet in (_aten._to_copy, _aten.copy_, _aten.copy):
            src = args[1] if packet is not _aten._to_copy else args[0]
            dst = kwargs.get("device") if packet is _aten._to_copy else args[0].device
            dst = torch.device(dst) if dst is not None else src.device
            return src.device.type not in ("cpu", "meta") and dst.type == "cpu"
        return False

    def _record(self, op: str, args) -> None:
        first = args[0] if args else None
        site = _call_site()
        if isinstance(first, torch.Tensor) and id(first) in self._host:
            self.exempt.append((op, f"host tensor at {site}"))
            return
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename.replace(os.sep, "/")
            if any(name.endswith(p) and frame.f_code.co_name == f for p, f in self._cpu_only):
                self.exempt.append((op, f"{name}:{frame.f_code.co_name}"))
                return
            frame = frame.f_back
        self.events.append((op, site))

    def __enter__(self) -> HostSyncCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


# Pass-through frames: torch's Python code, this counter, the CPU compatibility mode.
_NOT_CALL_SITES = (
    "/torch/",
    "fgclip_mega/profiling/host_syncs.py",
    "fgclip_mega/parallel/cpu_compat.py",
)


def _call_site() -> str:
    """file:line:function of the innermost frame outside torch's own Python code."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename.replace(os.sep, "/")
        if not any(part in name for part in _NOT_CALL_SITES):
            return f"{name.split('site-packages/')[-1]}:{frame.f_lineno}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


# Code that reads values only when its tensors are on the CPU: on a GPU the same call is free of
# syncs (text token ids: `torch._assert_async`; RoIAlign rois: checked only when on the host).
CPU_ONLY_CHECKS = (
    ("fgclip_mega/models/text.py", "_check_token_ids"),
    ("kernels/roi_align/checks.py", "check_roi_values"),
)


def optimizer_host_tensors(optimizer) -> list[torch.Tensor]:
    """torch Adam's per-parameter `step` counters: CPU tensors also on a GPU (not fused, not
    capturable), so reading them is no device sync."""
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", opt)
        for state in inner.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor) and step.device.type == "cpu":
                out.append(step)
    return out


def count_step_syncs(step_fn, optimizer) -> HostSyncCounter:
    """Host syncs of one call of `step_fn()` (e.g. a `train_step`); `optimizer` must have
    stepped once so that its state (whose step counters are exempt) exists."""
    counter = HostSyncCounter(optimizer_host_tensors(optimizer), CPU_ONLY_CHECKS)
    with counter:
        step_fn()
    return counter
