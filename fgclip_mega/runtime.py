"""The one place that decides where and how a run computes.

`resolve_runtime(cfg, device)` turns the config's "auto" settings into what this machine will
actually use: the device, the weight and compute dtypes, and the backends of attention, the
contrastive loss, RoIAlign and image decode. Model, loader, objective, profiler and `env.py`
take the resulting `Runtime` instead of probing again. `cuda_available()` is the single probe of
the accelerator (tests monkeypatch it to imitate a GPU machine): a GPU that this torch cannot use
(the CUDA 13 wheels need driver R580+) is an error there, not a silent CPU run.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from fgclip_mega.config import Config

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


ALLOW_CPU_ENV = "FGCLIP_ALLOW_CPU"
# The driver branch the pinned torch's CUDA major version needs (NVIDIA's CUDA release notes).
MIN_DRIVER = {"13": "R580", "12": "R525"}


class GPUUnusableError(RuntimeError):
    """An NVIDIA GPU is present but this torch cannot use it (driver too old, CPU-only build)."""


def gpu_present() -> bool:
    """An NVIDIA GPU is on this machine, usable or not: the driver's device nodes or its
    /proc file (no CUDA call, so it works whatever torch was built for)."""
    return any(Path("/dev").glob("nvidia[0-9]*")) or Path("/proc/driver/nvidia/version").exists()


def parse_driver_version(proc_text: str) -> str | None:
    """'535.104.05' from /proc/driver/nvidia/version ('NVRM version: NVIDIA UNIX x86_64 Kernel
    Module  535.104.05  ...', or '... Open Kernel Module for x86_64  580.65.06  ...')."""
    found = re.search(r"Kernel Module\s+(?:for\s+\S+\s+)?(\d+\.\d+(?:\.\d+)?)", proc_text)
    return found.group(1) if found else None


def nvidia_driver_version() -> str:
    """The loaded NVIDIA kernel driver's version (e.g. '535.104.05'), or 'unknown'."""
    try:
        found = parse_driver_version(Path("/proc/driver/nvidia/version").read_text())
        if found:
            return found
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _gpus_hidden() -> bool:
    # CUDA_VISIBLE_DEVICES="" (or -1) hides every GPU from CUDA on purpose: a CPU run was asked.
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    return value is not None and value.strip() in ("", "-1", "none", "NoDevFiles")


def unusable_gpu_message() -> str:
    from importlib import metadata

    cuda, base = torch.version.cuda, torch.__version__.split("+")[0]
    if cuda is None:
        why = f"torch {torch.__version__} is a CPU-only build"
    else:
        driver = MIN_DRIVER.get(cuda.split(".")[0], "new enough for it")
        why = f"torch {torch.__version__} is built for CUDA {cuda}, which needs driver {driver}+"
    try:
        vision = f" torchvision=={metadata.version('torchvision').split('+')[0]}"
    except metadata.PackageNotFoundError:
        vision = ""
    return (
        f"an NVIDIA GPU is present (driver {nvidia_driver_version()}) but torch cannot use it: "
        f"{why}. Fix: update the driver to R580 or newer (the pinned CUDA 13 wheels), or install "
        f"a CUDA 12.x torch: pip install torch=={base}{vision} --index-url "
        "https://download.pytorch.org/whl/cu126 (or the cu12x index pytorch.org lists for this "
        "release; with DALI, nvidia-dali-cuda120). "
        f"To run on the CPU anyway set {ALLOW_CPU_ENV}=1."
    )


def cuda_available() -> bool:
    """True when torch can use a GPU. A GPU that is present but unusable raises
    GPUUnusableError, unless the CPU was asked for: FGCLIP_ALLOW_CPU=1, or CUDA_VISIBLE_DEVICES
    set empty (or -1)."""
    if torch.cuda.is_available():
        return True
    if gpu_present() and os.environ.get(ALLOW_CPU_ENV) != "1" and not _gpus_hidden():
        raise GPUUnusableError(unusable_gpu_message())
    return False


def default_device() -> torch.device:
    """This process's accelerator (torchrun's LOCAL_RANK picks it via set_device) or the CPU."""
    if cuda_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    """Where this rank computes."""
    params_dtype: torch.dtype
    """Dtype of the model weights (temperatures stay fp32: they are their own main copy)."""
    compute_dtype: torch.dtype
    """Autocast dtype of the towers' forward (fp32 = no autocast)."""
    attention: str
    """Attention kernel the towers call: flash, sdpa or math."""
    contrastive: str
    """Contrastive-loss implementation: triton, chunked or naive."""
    roi_align: str
    """RoIAlign implementation: cuda, cpu (the C++ extension) or reference (pure PyTorch)."""
    decode: str
    """Image decode: DALI mixed (nvJPEG) or cpu, or pil (the reference loader); '' = not asked."""

    def autocast(self):
        """Autocast to the compute dtype for the towers; a no-op in fp32."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def describe(self) -> dict[str, str]:
        return {
            "device": str(self.device),
            "params_dtype": str(self.params_dtype).removeprefix("torch."),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "attention": self.attention,
            "contrastive": self.contrastive,
            "roi_align": self.roi_align,
            "decode": self.decode or "n/a",
        }


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA (megatron keeps fp32 main params) and fp32 on CPU, where bf16
    matmul is ~4x slower."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[setting]


def resolve_runtime(
    cfg: Config, device: torch.device | None = None, *, with_decode: bool = True
) -> Runtime:
    """Resolves every backend once. `with_decode=False` skips DALI (its import costs seconds)."""
    from fgclip_mega.losses.dispatch import resolve_implementation
    from fgclip_mega.models.attention import resolve_backend

    device = torch.device(device) if device is not None else default_device()
    params_dtype = resolve_dtype(cfg.precision.params_dtype, device)
    compute_dtype = resolve_dtype(cfg.precision.compute_dtype, device)
    decode = ""
    if with_decode:
        from fgclip_mega.data.loader import resolve_decode_device, resolve_loader_kind

        if resolve_loader_kind(cfg.data.loader) == "pil":
            decode = "pil"
        else:
            decode = resolve_decode_device(cfg.data.decode_device, device)
    return Runtime(
        device=device,
        params_dtype=params_dtype,
        compute_dtype=compute_dtype,
        attention=resolve_backend(cfg.model.attention_backend, device, compute_dtype),
        contrastive=resolve_implementation(cfg.loss.implementation, device),
        roi_align=_roi_align_kind(device),
        decode=decode,
    )


def _roi_align_kind(device: torch.device) -> str:
    # Reported only: kernels.roi_align's own dispatch enforces it (a CUDA run without the CUDA
    # extension stops there with an error instead of falling back).
    from kernels.roi_align import load_library

    status = load_library()
    if device.type == "cuda":
        return "cuda" if status.cuda else "missing"
    return "cpu" if status.cpu else "reference"


def configure_device(device: torch.device) -> None:
    """Process-wide math settings for the device: TF32 for any fp32 matmul on GPUs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
