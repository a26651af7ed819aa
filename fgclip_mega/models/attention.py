"""The one attention dispatch: flash-attn on CUDA when installed, else torch SDPA, or plain math.

`attention(q, k, v, causal, backend)` takes and returns (B, H, N, hd). `resolve_backend` says which
kernel a call with given device/dtype gets; the model logs it once at build time.
"""

from __future__ import annotations

import functools
import importlib.util
import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "math")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def flash_attn_installed() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel `attention` uses for inputs on `device` with `dtype`: flash, sdpa or math."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {BACKENDS}")
    flash_ok = flash_attn_installed() and device.type == "cuda" and dtype in _FLASH_DTYPES
    if requested == "auto":
        return "flash" if flash_ok else "sdpa"
    if requested == "flash" and not flash_ok:
        raise RuntimeError(
            "attention backend 'flash' needs the flash_attn package, a CUDA device and fp16/bf16 "
            f"inputs (installed={flash_attn_installed()}, device={device}, dtype={dtype}); "
            "use 'auto' or 'sdpa'"
        )
    return requested


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(hd)) v in fp32; (B, H, N, hd) -> (B, H, N, hd)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if causal:
        n = q.shape[-2]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)


def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from flash_attn import flash_attn_func

    # flash-attn wants (B, N, H, hd) contiguous.
    q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    return flash_attn_func(q, k, v, causal=causal).transpose(1, 2)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend: str = "auto"
) -> torch.Tensor:
    """Scaled dot-product self-attention; q, k, v (B, H, N, hd) -> (B, H, N, hd)."""
    name = resolve_backend(backend, q.device, q.dtype)
    if name == "flash":
        return _flash(q, k, v, causal)
    if name == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return math_attention(q, k, v, causal)
