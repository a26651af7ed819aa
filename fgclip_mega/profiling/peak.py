"""Peak matmul FLOP/s of one accelerator, and model FLOPs utilisation (MFU).

GPUs: dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets, matched on
`torch.cuda.get_device_name()`; bf16/fp16 use the bf16 figure, fp32 the TF32 one (fp32 matmuls
run on TF32 tensor cores when `torch.backends.cuda.matmul.allow_tf32` / matmul precision
"high" is set; with strict fp32 the real ceiling is lower and MFU reads high). CPU: measured
once per process with a timed fp32 matmul (bf16 is several times slower on CPUs without
AMX/AVX512_BF16, so fp32 is the dtype CPU runs use).
"""

from __future__ import annotations

import functools
import math
import time

import torch

# (substring of the device name, bf16 dense FLOP/s, TF32 dense FLOP/s); first match wins, so
# the more specific names come first.
GPU_PEAKS: tuple[tuple[str, float, float], ...] = (
    ("H100 PCIe", 756e12, 378e12),
    ("H100 NVL", 835e12, 417.5e12),
    ("H200 NVL", 835e12, 417.5e12),
    ("H200", 989e12, 494.5e12),  # SXM
    ("H100", 989e12, 494.5e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("A100", 312e12, 156e12),
    ("L40S", 362e12, 183e12),
)

_HALF = {"bf16", "fp16", "bfloat16", "float16"}
_FULL = {"fp32", "float32", "tf32"}


def _dtype_name(dtype: torch.dtype | str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _HALF | _FULL:
        raise ValueError(f"dtype {dtype!r} has no peak figure; use bf16, fp16 or fp32")
    return name


def gpu_peak_flops(device_name: str, dtype: torch.dtype | str = torch.bfloat16) -> float:
    """Dense tensor-core FLOP/s of the GPU called `device_name` for matmuls in `dtype`."""
    half = _dtype_name(dtype) in _HALF
    for key, bf16, tf32 in GPU_PEAKS:
        if key.lower() in device_name.lower():
            return bf16 if half else tf32
    known = ", ".join(k for k, _, _ in GPU_PEAKS)
    raise ValueError(
        f"no peak FLOP/s known for GPU {device_name!r} (known: {known}); pass the peak explicitly"
    )


@functools.cache
def measured_cpu_peak_flops(size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 matmul FLOP/s of this process's torch threads over `repeats` timed runs."""
    # A private generator: the trainer measures after restoring a checkpoint's RNG state, and
    # drawing from the global one there would shift a resumed run's random stream.
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)  # warm-up: thread pool, allocation
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / max(best, 1e-9)


def device_peak_flops(
    device: torch.device | str | None = None, dtype: torch.dtype | str = torch.bfloat16
) -> float:
    """Peak FLOP/s of one device: the GPU table for CUDA devices (default: the current one when
    CUDA is available), the measured fp32 matmul rate on CPU (whatever `dtype`)."""
    if device is None:
        from fgclip_mega.runtime import default_device

        device = default_device()
    device = torch.device(device)
    if device.type == "cuda":
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype)
    if device.type == "cpu":
        _dtype_name(dtype)
        return measured_cpu_peak_flops()
    raise ValueError(f"no peak FLOP/s for device type {device.type!r}")


def mfu(flops_per_step: float, step_seconds: float, n_devices: int, peak: float) -> float:
    """Fraction of `n_devices` x `peak` FLOP/s that `flops_per_step` in `step_seconds` uses.

    Pass model FLOPs for MFU, hardware FLOPs (with recompute) for HFU, both summed over the
    whole job's step (see FlopReport.step_model_flops)."""
    for name, value in (("flops_per_step", flops_per_step), ("step_seconds", step_seconds),
                        ("peak", peak)):  # fmt: skip
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be an int >= 1, got {n_devices!r}")
    return flops_per_step / (step_seconds * n_devices * peak)
