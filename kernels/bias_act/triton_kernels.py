"""Elementwise Triton kernels over a contiguous (M, F) tensor seen flat; bias (F,) broadcast by
column (offset % F). Math in fp32, stores in the output's dtype."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bias_quick_gelu_fwd(y_ptr, b_ptr, out_ptr, n, F, ALPHA: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs % F, mask=mask, other=0.0).to(tl.float32)
    x = y + b
    out = x * tl.sigmoid(ALPHA * x)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_quick_gelu_bwd(
    g_ptr, y_ptr, b_ptr, dx_ptr, n, F, ALPHA: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs % F, mask=mask, other=0.0).to(tl.float32)
    x = y + b
    s = tl.sigmoid(ALPHA * x)
    # d/dx x s(ax) = s + a x s (1 - s) = s (1 + a x (1 - s))
    dx = g * s * (1.0 + ALPHA * x * (1.0 - s))
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
