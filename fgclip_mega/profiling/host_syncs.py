"""Counting host syncs: what would make the host wait for a GPU, counted on any device.

Both directions count: device->host reads (a scalar, a copy to the CPU, a data-dependent shape)
and host->device copies of pageable host data (`torch.tensor(data, device=...)`, `.to(device)`
of a CPU tensor): CUDA copies from pageable memory and then synchronizes the stream. A step's
budget (tests/test_host_syncs.py) and `run/bench_step.py` use it.
"""

from __future__ import annotations

import os
import sys
import weakref

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


# Creation of a tensor from host data (Python numbers, lists, numpy, CPU tensors) on a device.
_FROM_DATA = {torch.tensor, torch.as_tensor, torch.asarray}
_TO = torch.Tensor.to
# Results that live on the host (pinned or read back): a later `.to(device)` of them is a copy.
_HOST_RESULTS = {torch.Tensor.pin_memory, torch.Tensor.cpu}


class _TensorSet:
    """Tensors by identity, not kept alive (a freed tensor's id may be reused)."""

    def __init__(self, tensors=()):
        self._refs: dict[int, weakref.ref] = {}
        for t in tensors:
            self.add(t)

    def add(self, t: torch.Tensor) -> None:
        self._refs[id(t)] = weakref.ref(t)

    def __contains__(self, t) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


def _tensors(values) -> list[torch.Tensor]:
    """Tensors among `values`, one level into lists and tuples (foreach ops take lists)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out.extend(x for x in v if isinstance(x, torch.Tensor))
    return out


def _to_target(args, kwargs) -> tuple[object, bool]:
    """(device, non_blocking) of a `Tensor.to(...)` call; device None for a dtype-only cast."""
    device, non_blocking = kwargs.get("device"), kwargs.get("non_blocking")
    if isinstance(kwargs.get("other"), torch.Tensor):
        device = kwargs["other"].device
    for a in args[1:]:
        if isinstance(a, torch.Tensor):
            device = a.device
        elif isinstance(a, bool):
            non_blocking = a if non_blocking is None else non_blocking  # then `copy`
        elif isinstance(a, (str, torch.device, int)):
            device = a
    return device, bool(non_blocking)


def _is_bool_index(indices) -> bool:
    return any(
        isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ()
    )


class HostSyncCounter:
    """Counts what would make the host wait for the device while it is active.

    Counted device->host: scalar reads (`.item()`, `bool()`, `float()`, `torch.equal`), ops with
    a data-dependent output shape (nonzero, boolean-mask indexing and assignment, masked_select,
    unique, repeat_interleave without output_size), copies from a non-CPU tensor to the CPU, and
    `Tensor.tolist/numpy/cpu` calls. Counted host->device (named 'host->device ...'):
    `torch.tensor/as_tensor/asarray(data, device=D)` and `t.new_tensor(data)` of a device tensor
    `t`, and `.to(D)`, `.cuda()`, `dst.copy_(src)` from a host tensor, unless it is pinned and
    the copy non_blocking. `fill_`/`torch.full` with a Python number are kernels, not copies.

    `device` is the accelerator the code runs on. On a GPU a host tensor is a CPU tensor and D
    counts when it is that device. On the CPU (`device` cpu, the default) the CPU stands in for
    the accelerator: any explicit D counts except the string 'cpu' (a `torch.device` such as
    `x.device` stands for the accelerator; code that means the host spells 'cpu', as torch's
    Adam does for its step counters, or gives no device); `.to('cpu')` of a device tensor
    counts as a device->host copy; and a host tensor is one that lives on the host on a GPU
    too: `host_tensors`, tensors created here without a device (from data or by a factory),
    pinned or `.cpu()` results, and results of ops whose tensor inputs are all host tensors.

    Two exemptions say which reads would not touch a device on a GPU:
    - `host_tensors`: tensors that live on the host on a GPU too (torch Adam's `step` counters);
    - `cpu_only`: (path suffix, function name) of code that runs only for CPU tensors and takes a
      sync-free branch for device tensors (e.g. a token check that uses `_assert_async` on GPU).
    `events` lists (op, call site) per counted sync, for error messages.
    """

    def __init__(
        self,
        host_tensors=(),
        cpu_only: tuple[tuple[str, str], ...] = (),
        device: torch.device | str = "cpu",
    ):
        self._host = _TensorSet(host_tensors)
        self._cpu_only = tuple(cpu_only)
        self.device = torch.device(device)
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
                kwargs = kwargs or {}
                if func in _HOST_METHODS:
                    counter._record(f"Tensor.{func.__name__}", args)
                copy, result_on_host = counter._host_to_device(func, args, kwargs)
                if copy:
                    counter._record(f"host->device {copy}", args, host_exempt=False)
                result = func(*args, **kwargs)
                if result_on_host:
                    for t in _tensors([result]):
                        counter._host.add(t)
                return result

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

    def _is_host(self, t: torch.Tensor) -> bool:
        """Lives on the host on a GPU machine too."""
        return t in self._host or (self.device.type != "cpu" and t.device.type == "cpu")

    def _is_target(self, device) -> bool:
        """An explicit `device` argument that means the accelerator (see the class doc)."""
        if device is None or (isinstance(device, str) and device.startswith("cpu")):
            return False  # the host, spelled out (or no placement)
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type == "meta":
            return False
        return self.device.type == "cpu" or device.type == self.device.type

    def _pinned_async(self, src: torch.Tensor, non_blocking: bool) -> bool:
        return non_blocking and src.device.type == "cpu" and src.is_pinned()

    def _host_to_device(self, func, args, kwargs) -> tuple[str, bool]:
        """(name of the host->device copy this call makes or '', whether its result is a host
        tensor)."""
        if func in _FROM_DATA:
            data = args[0] if args else next(iter(kwargs.values()), None)
            from_host = not isinstance(data, torch.Tensor) or self._is_host(data)
            if self._is_target(kwargs.get("device")):
                return (f"{func.__name__}(host data, device=...)" if from_host else ""), False
            return "", from_host
        if func is torch.Tensor.new_tensor:
            on_device = (
                self._is_target(kwargs["device"])
                if kwargs.get("device") is not None
                else not self._is_host(args[0])
            )
            return ("Tensor.new_tensor(host data)" if on_device else ""), not on_device
        if func is _TO:
            src = args[0]
            device, non_blocking = _to_target(args, kwargs)
            if device is None:  # a dtype cast stays where it is
                return "", self._is_host(src)
            if not self._is_target(device):
                if device == "cpu" and self.device.type == "cpu" and not self._is_host(src):
                    self._record("Tensor.to('cpu') of a device tensor", args, host_exempt=False)
                return "", True
            copy = self._is_host(src) and not self._pinned_async(src, non_blocking)
            return ("Tensor.to(device) of a host tensor" if copy else ""), False
        if func is torch.Tensor.cuda:
            src = args[0]
            non_blocking = bool(kwargs.get("non_blocking", len(args) > 2 and args[2]))
            copy = self._is_host(src) and not self._pinned_async(src, non_blocking)
            return ("Tensor.cuda() of a host tensor" if copy else ""), False
        if func is torch.Tensor.copy_:
            dst, src = args[0], args[1] if len(args) > 1 else kwargs.get("src")
            non_blocking = bool(kwargs.get("non_blocking", len(args) > 2 and args[2]))
            copy = (
                isinstance(src, torch.Tensor)
                and self._is_host(src)
                and not self._is_host(dst)
                and not self._pinned_async(src, non_blocking)
            )
            return ("Tensor.copy_(host tensor)" if copy else ""), self._is_host(dst)
        if func in _HOST_RESULTS:
            return "", True
        inputs = _tensors([*args, *kwargs.values()])
        if not inputs:  # a factory: on the host unless placed on the device
            return "", not self._is_target(kwargs.get("device"))
        return "", all(self._is_host(t) for t in inputs)

    def _record(self, op: str, args, host_exempt: bool = True) -> None:
        first = args[0] if args else None
        site = _call_site()
        if host_exempt and isinstance(first, torch.Tensor) and first in self._host:
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
# syncs (text token ids and the DP shape check: `torch._assert_async`; RoIAlign rois: checked
# only when on the host).
CPU_ONLY_CHECKS = (
    ("fgclip_mega/models/text.py", "_check_token_ids"),
    ("kernels/roi_align/checks.py", "check_roi_values"),
    ("fgclip_mega/losses/collectives.py", "_raise_if_different"),
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


def _params_device(optimizer) -> torch.device:
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(opt, "param_groups", []):
            for p in group["params"]:
                return p.device
    return torch.device("cpu")


def count_step_syncs(step_fn, optimizer) -> HostSyncCounter:
    """Host syncs of one call of `step_fn()` (e.g. a `train_step`), on the device of the
    optimizer's params; `optimizer` must have stepped once so that its state (whose step
    counters are exempt) exists."""
    counter = HostSyncCounter(
        optimizer_host_tensors(optimizer), CPU_ONLY_CHECKS, device=_params_device(optimizer)
    )
    with counter:
        step_fn()
    return counter
