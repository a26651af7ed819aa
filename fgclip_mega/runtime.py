"""The one place that decides where and how a run computes.

`resolve_runtime(cfg, device)` turns the config's "auto" settings into what this machine will
actually use: the device, the weight and compute dtypes, and the backends of attention, the
contrastive loss, RoIAlign and image decode. Model, loader, objective, profiler and `env.py`
take the resulting `Runtime` instead of probing again. `cuda_available()` is the single probe of
the accelerator (tests monkeypatch it to imitate a GPU machine).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from fgclip_mega.config import Config

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cuda_available() -> bool:
    return torch.cuda.is_available()


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
