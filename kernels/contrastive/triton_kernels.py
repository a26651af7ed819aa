"""Triton kernels of the tiled contrastive statistics (same math as chunked.py).

x = scale * X @ Y.T + bias is formed one (BLOCK_M, BLOCK_N) tile at a time with fp32
accumulation. With HAS_TARGET, entry (i, i + OFFSET) is row i's positive (OFFSET may be negative:
the swapped, column-direction forward passes -offset; the backward passes slab-local offsets).
  `_fwd_split_kernel`: program (m, s) walks the columns of split s (COLS_PER_SPLIT of them) for
      BLOCK_M rows of X and writes one fp32 partial statistic per (row, split): the log-sum-exp of
      its columns (softmax) or the sum of -log sigmoid(z x) (sigmoid). The launcher merges the
      splits (logsumexp / sum), flash-decoding style, so a few local rows against many gathered
      columns still fill the GPU. Column statistics are the same kernel with X and Y swapped.
  `_grad_tile_kernel`: one program per (BLOCK_M, BLOCK_N) tile of a slab of x forms
      G = dLoss/dx (see chunked.py) for the row and/or column losses at once, stores it in the
      slab buffer and writes per-(column block, row) partial sums of G * (X @ Y.T) and of G (for
      dscale and dbias). The launcher then takes dX += G @ Y and dY += G.T @ X with cuBLAS, so
      each logit is computed once per backward instead of once per feature slice and direction.
UPCAST (set by the launcher under TRITON_INTERPRET) converts bf16 operands to fp32 before tl.dot,
whose bf16 path is wrong in the interpreter; on a GPU the native bf16 dot accumulates in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softplus(x):
    # log(1 + e^x) = max(x, 0) + log1p(e^-|x|); log1p by its series where 1 + u would round.
    u = tl.exp(-tl.abs(x))
    log1p = tl.where(u < 1e-3, u * (1.0 - u * (0.5 - u * 0.3333333333333333)), tl.log(1.0 + u))
    return tl.maximum(x, 0.0) + log1p


@triton.jit
def _dot_tile(
    X,
    Y,
    rows,
    cols,
    rmask,
    cmask,
    D,
    stride_x,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # (BLOCK_M, BLOCK_N) fp32 tile of X[rows] @ Y[cols].T, summed over D in BLOCK_K slices.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < D
        x = tl.load(
            X + rows[:, None] * stride_x + ks[None, :],
            mask=rmask[:, None] & kmask[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_K)
        y = tl.load(
            Y + cols[None, :] * stride_y + ks[:, None],
            mask=cmask[None, :] & kmask[:, None],
            other=0.0,
        )  # (BLOCK_K, BLOCK_N)
        if UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        acc = tl.dot(x, y, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _fwd_split_kernel(
    X,
    Y,
    OUT,
    SCALE,
    BIAS,
    R,
    C,
    D,
    stride_x,
    stride_y,
    OFFSET,
    COLS_PER_SPLIT,
    N_SPLIT,
    HAS_TARGET: tl.constexpr,
    SOFTMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < R
    c_lo = pid_s * COLS_PER_SPLIT
    c_hi = tl.minimum(c_lo + COLS_PER_SPLIT, C)
    s = tl.load(SCALE).to(tl.float32)
    t = tl.load(BIAS).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (softmax)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(x - m), or of softplus
    for n0 in range(c_lo, c_hi, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < c_hi
        dot = _dot_tile(
            X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y,
            BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
        x = dot * s + t  # (BLOCK_M, BLOCK_N)
        if SOFTMAX:
            x = tl.where(cmask[None, :], x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            acc = acc * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)
            m = m_new
        else:
            if HAS_TARGET:  # -log sigmoid(z x): z = +1 at the positive (i, i + OFFSET), else -1
                pos = cols[None, :] == rows[:, None] + OFFSET
                sp = _softplus(tl.where(pos, -x, x))
            else:
                sp = _softplus(x)
            acc += tl.sum(tl.where(cmask[None, :], sp, 0.0), 1)
    if SOFTMAX:
        out = m + tl.log(acc)  # -inf for a split without columns
    else:
        out = acc
    tl.store(OUT + rows * N_SPLIT + pid_s, out, mask=rmask)


@triton.jit
def _grad_tile_kernel(
    X,
    Y,
    G,
    PART,
    SCALE,
    BIAS,
    STAT_R,
    G_R,
    STAT_C,
    G_C,
    R,
    C,
    D,
    stride_x,
    stride_y,
    stride_g,
    OFFSET,
    HAS_TARGET: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_ROW: tl.constexpr,
    HAS_COL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rmask = rows < R
    cmask = cols < C
    s = tl.load(SCALE).to(tl.float32)
    t = tl.load(BIAS).to(tl.float32)
    dot = _dot_tile(
        X, Y, rows, cols, rmask, cmask, D, stride_x, stride_y,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
    )  # fmt: skip
    x = dot * s + t  # (BLOCK_M, BLOCK_N)
    G_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_TARGET:
        pos = cols[None, :] == rows[:, None] + OFFSET  # (i, i + OFFSET): the positives
    if HAS_ROW:
        g_r = tl.load(G_R + rows, mask=rmask, other=0.0)  # (BLOCK_M,)
    if HAS_COL:
        g_c = tl.load(G_C + cols, mask=cmask, other=0.0)  # (BLOCK_N,)
    if SOFTMAX:
        if HAS_ROW:
            st_r = tl.load(STAT_R + rows, mask=rmask, other=0.0)
            G_tile += g_r[:, None] * tl.exp(x - st_r[:, None])
            if HAS_TARGET:
                G_tile -= tl.where(pos, g_r[:, None], 0.0)
        if HAS_COL:
            st_c = tl.load(STAT_C + cols, mask=cmask, other=0.0)
            G_tile += g_c[None, :] * tl.exp(x - st_c[None, :])
            if HAS_TARGET:
                G_tile -= tl.where(pos, g_c[None, :], 0.0)
    else:
        if HAS_TARGET:  # d/dx -log sigmoid(z x) = -z sigmoid(-z x), exact at both signs
            sig = tl.where(pos, -tl.sigmoid(-x), tl.sigmoid(x))
        else:
            sig = tl.sigmoid(x)
        if HAS_ROW:
            G_tile += g_r[:, None] * sig
        if HAS_COL:
            G_tile += g_c[None, :] * sig
    # Padding rows/columns may hold 0 * inf = nan before this.
    inside = rmask[:, None] & cmask[None, :]
    G_tile = tl.where(inside, G_tile, 0.0)
    tl.store(
        G + rows[:, None] * stride_g + cols[None, :],
        G_tile.to(G.dtype.element_ty),
        mask=inside,
    )
    part = PART + (pid_n * R + rows) * 2  # (column blocks, R, 2)
    tl.store(part, tl.sum(G_tile * dot, 1), mask=rmask)
    tl.store(part + 1, tl.sum(G_tile, 1), mask=rmask)
