"""The one attention dispatch: flash-attn on CUDA when it works, else torch SDPA, or plain math.

`attention(q, k, v, causal, backend)` takes and returns (B, N, H, hd), flash-attn's own layout:
the towers pass strided views with unit last-dim stride, so no backend copies its inputs.
`resolve_backend` says which kernel a run gets; the runtime resolves it once per run.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "flash", "sdpa", "math")
_FLASH_DTYPES = (torch.float16, torch.bfloat16)
_log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def flash_attn_status() -> tuple[bool, str]:
    """(usable, detail): flash-attn imports and its CUDA extension loads. An installed but
    ABI-broken build fails here, at resolution, instead of at the first forward."""
    try:
        import flash_attn
        from flash_attn import flash_attn_func  # noqa: F401 - imports the CUDA extension
    except ImportError as e:
        return False, f"not installed ({e})"
    except Exception as e:  # noqa: BLE001 - a broken build is reported, not raised
        return False, f"import failed: {type(e).__name__}: {e}"
    return True, str(getattr(flash_attn, "__version__", "installed"))


def masked_sdpa_backends(device: torch.device, masked: bool):
    """With a padding mask on CUDA, SDPA may take only its memory-efficient or cuDNN kernel: its
    flash kernel takes no mask, and a silent fall-back to the math kernel (O(N^2) memory per head
    in the activation dtype) is what NaFlex batches must not get; an unsupported case is then an
    error. Elsewhere (CPU, no mask) SDPA chooses as it always does."""
    if not masked or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION])


def flash_attn_installed() -> bool:
    return flash_attn_status()[0]


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The kernel `attention` uses on `device` when the towers compute in `dtype` (the autocast
    dtype under autocast, where q/k/v are cast to it): flash, sdpa or math."""
    if requested not in BACKENDS:
        raise ValueError(f"attention backend {requested!r} is not one of {BACKENDS}")
    device = torch.device(device)
    usable, detail = flash_attn_status() if device.type == "cuda" else (False, "no CUDA")
    flash_ok = usable and dtype in _FLASH_DTYPES
    if requested == "auto":
        return "flash" if flash_ok else "sdpa"
    if requested == "flash" and not flash_ok:
        raise RuntimeError(
            "model.attention_backend=flash needs a working flash_attn, a CUDA device and "
            f"fp16/bf16 compute (flash_attn: {detail}; device={device}, dtype={dtype}); "
            "use 'auto' or 'sdpa'"
        )
    return requested


def math_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(hd)) v in fp32; (B, N, H, hd) -> (B, N, H, hd)."""
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))  # (B, H, N, hd)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    if causal:
        n = q.shape[-2]
        future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool):
    """flash-attn on (B, N, H, hd) bf16/fp16 with unit last-dim stride (no copy needed)."""
    from flash_attn import flash_attn_func

    return flash_attn_func(q, k, v, causal=causal)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool,
    backend: str = "sdpa",
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product self-attention; q, k, v (B, N, H, hd) -> (B, N, H, hd) in q's dtype.

    `backend` is a resolved name (flash, sdpa, math); 'auto' resolves here per call.
    `key_padding_mask` (B, N) bool, True = attend (NaFlex padding); with a mask the flash
    backend runs as SDPA, whose memory-efficient and cuDNN kernels take a mask (flash-attn's
    own would need the batch unpadded into a varlen layout)."""
    if backend == "auto":
        backend = resolve_backend(backend, q.device, q.dtype)
    if causal and key_padding_mask is not None:
        raise ValueError("a key padding mask with causal attention is not supported")
    if backend == "flash" and key_padding_mask is None:
        return flash_attention(q, k, v, causal)
    if backend in ("flash", "sdpa"):
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        with masked_sdpa_backends(q.device, mask is not None):
            out = F.scaled_dot_product_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=mask,
                is_causal=causal,
            )  # (B, H, N, hd)
        return out.transpose(1, 2)
    return math_attention(q, k, v, causal, key_padding_mask).to(q.dtype)
