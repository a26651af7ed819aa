"""Launchers of the Triton contrastive kernels: the `fwd` / `bwd` primitives of chunked.py.

Block sizes are chosen explicitly (no autotune, which needs a GPU timer): under the interpreter
(TRITON_INTERPRET=1, the CPU test path) few large tiles, because its cost grows with the number of
program instances; on a GPU 64 x 64 logit tiles and an output feature slice of up to 128.
"""

from __future__ import annotations

import os

import torch
import triton

from kernels.contrastive.triton_kernels import _bwd_rows_kernel, _fwd_rows_kernel


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _config(D: int, dtype: torch.dtype) -> dict:
    if interpreting():
        # bf16 tl.dot is wrong in the interpreter (triton issue 11584): fp32 dots there.
        k = _pow2(D, 16, 256)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=k, BLOCK_D=k, UPCAST=True, PRECISION="ieee")
    # fp32 inputs: 3xTF32 keeps ~fp32 accuracy on tensor cores; bf16 uses the native dot.
    precision = "tf32x3" if dtype == torch.float32 else "tf32"
    return dict(
        BLOCK_M=64,
        BLOCK_N=64,
        BLOCK_K=_pow2(D, 16, 64),
        BLOCK_D=_pow2(D, 16, 128),
        UPCAST=False,
        PRECISION=precision,
        num_warps=4,
        num_stages=2,
    )


def _prep(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.dtype != b.dtype:
        raise TypeError(f"a is {a.dtype} but b is {b.dtype}")
    if a.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"Triton contrastive kernels take fp32/bf16/fp16, got {a.dtype}")
    return a.contiguous(), b.contiguous()


def _rows_stat(x, y, scale, bias, softmax: bool, offset: int | None) -> torch.Tensor:
    R, D = x.shape
    out = torch.empty(R, dtype=torch.float32, device=x.device)  # (R,)
    if R == 0:
        return out
    cfg = _config(D, x.dtype)
    grid = (triton.cdiv(R, cfg["BLOCK_M"]),)
    cfg = {k: v for k, v in cfg.items() if k != "BLOCK_D"}
    _fwd_rows_kernel[grid](
        x, y, out, scale, bias, R, y.shape[0], D, x.stride(0), y.stride(0), offset or 0,
        HAS_TARGET=offset is not None, SOFTMAX=softmax, **cfg,
    )  # fmt: skip
    return out


def _rows_grad(x, y, scale, bias, softmax, stat_r, g_r, stat_c, g_c, write_part, offset):
    R, D = x.shape
    dx = torch.empty(R, D, dtype=torch.float32, device=x.device)  # (R, D)
    part = torch.zeros(R, 2, dtype=torch.float32, device=x.device)  # per-row dscale, dbias terms
    if R == 0 or D == 0:
        return dx.zero_(), part
    dummy = dx  # never read when the matching HAS_* flag is off
    cfg = _config(D, x.dtype)
    grid = (triton.cdiv(R, cfg["BLOCK_M"]), triton.cdiv(D, cfg["BLOCK_D"]))
    _bwd_rows_kernel[grid](
        x, y, dx, part, scale, bias,
        stat_r if stat_r is not None else dummy, g_r if g_r is not None else dummy,
        stat_c if stat_c is not None else dummy, g_c if g_c is not None else dummy,
        R, y.shape[0], D, x.stride(0), y.stride(0), dx.stride(0), offset or 0,
        HAS_TARGET=offset is not None, SOFTMAX=softmax,
        HAS_ROW=g_r is not None, HAS_COL=g_c is not None, WRITE_PART=write_part, **cfg,
    )  # fmt: skip
    return dx, part


def fwd(a, b, scale, bias, kind, rows=True, cols=False, chunk=None, offset=None):
    """Same contract as chunked.fwd; `chunk` is ignored (tiles are the kernel's blocks)."""
    a, b = _prep(a, b)
    softmax = kind == "softmax"
    scale, bias = scale.detach().float().contiguous(), bias.detach().float().contiguous()
    if b.shape[0] == 0:  # no columns: empty sums
        init = float("-inf") if softmax else 0.0
        row = torch.full((a.shape[0],), init, device=a.device) if rows else None
        return row, (torch.empty(0, device=a.device) if cols else None)
    row = _rows_stat(a, b, scale, bias, softmax, offset) if rows else None
    # Columns: rows of b against a, where column j's positive is row j - offset.
    neg = None if offset is None else -offset
    col = _rows_stat(b, a, scale, bias, softmax, neg) if cols else None
    return row, col


def bwd(a, b, scale, bias, kind, row_stat, g_row, col_stat, g_col, chunk=None, offset=None):
    """Same contract as chunked.bwd."""
    a, b = _prep(a, b)
    softmax = kind == "softmax"
    scale, bias = scale.detach().float().contiguous(), bias.detach().float().contiguous()
    g_row = None if g_row is None else g_row.float().contiguous()
    g_col = None if g_col is None else g_col.float().contiguous()
    row_stat = None if row_stat is None else row_stat.float().contiguous()
    col_stat = None if col_stat is None else col_stat.float().contiguous()
    da, part = _rows_grad(
        a, b, scale, bias, softmax, row_stat, g_row, col_stat, g_col, True, offset
    )
    # dB: the same kernel on the transposed problem (rows of b against the columns a).
    neg = None if offset is None else -offset
    db, _ = _rows_grad(b, a, scale, bias, softmax, col_stat, g_col, row_stat, g_row, False, neg)
    sums = part.sum(0)  # (2,)
    return da, db, sums[0], sums[1]
