"""Triton kernels of the tiled contrastive statistics (same math as chunked.py).

x = scale * X @ Y.T + bias is formed one (BLOCK_M, BLOCK_N) tile at a time with fp32
accumulation and never written to memory. With HAS_TARGET, entry (i, i + OFFSET) is row i's
positive (OFFSET may be negative: the swapped, column-direction call passes -offset).
  `_fwd_rows_kernel`: one program per BLOCK_M rows of X walks all columns and writes one fp32
      statistic per row: the online log-sum-exp (softmax) or the row's SigLIP loss, the sum of
      -log sigmoid(z x) (sigmoid).
      Column statistics are the same kernel with X and Y swapped.
  `_bwd_rows_kernel`: one program per (BLOCK_M rows, BLOCK_D features) recomputes the tiles, forms
      G = dLoss/dx (see chunked.py) and accumulates dX = scale * G @ Y; the (R, 2) per-row partial
      sums of G * (X @ Y.T) and G give dscale and dbias. dY is the same kernel with X and Y (and
      row/column statistics) swapped.
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
def _fwd_rows_kernel(
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
    HAS_TARGET: tl.constexpr,
    SOFTMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < R
    s = tl.load(SCALE).to(tl.float32)
    t = tl.load(BIAS).to(tl.float32)
    m = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running row max (softmax)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp(x - m), or of softplus
    for n0 in range(0, C, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < C
        x = (
            _dot_tile(
                X,
                Y,
                rows,
                cols,
                rmask,
                cmask,
                D,
                stride_x,
                stride_y,
                BLOCK_M,
                BLOCK_N,
                BLOCK_K,
                UPCAST,
                PRECISION,
            )
            * s
            + t
        )
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
        out = m + tl.log(acc)
    else:
        out = acc
    tl.store(OUT + rows, out, mask=rmask)


@triton.jit
def _bwd_rows_kernel(
    X,
    Y,
    DX,
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
    stride_dx,
    OFFSET,
    HAS_TARGET: tl.constexpr,
    SOFTMAX: tl.constexpr,
    HAS_ROW: tl.constexpr,
    HAS_COL: tl.constexpr,
    WRITE_PART: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < R
    feats = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    fmask = feats < D
    s = tl.load(SCALE).to(tl.float32)
    t = tl.load(BIAS).to(tl.float32)
    if HAS_ROW:
        g_r = tl.load(G_R + rows, mask=rmask, other=0.0)  # (BLOCK_M,)
        st_r = tl.load(STAT_R + rows, mask=rmask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)  # dX tile / scale
    part_s = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_j G_ij (X @ Y.T)_ij
    part_t = tl.zeros((BLOCK_M,), dtype=tl.float32)  # sum_j G_ij
    for n0 in range(0, C, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        cmask = cols < C
        dot = _dot_tile(
            X,
            Y,
            rows,
            cols,
            rmask,
            cmask,
            D,
            stride_x,
            stride_y,
            BLOCK_M,
            BLOCK_N,
            BLOCK_K,
            UPCAST,
            PRECISION,
        )
        x = dot * s + t
        G = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if HAS_COL:
            g_c = tl.load(G_C + cols, mask=cmask, other=0.0)  # (BLOCK_N,)
        if HAS_TARGET:
            pos = cols[None, :] == rows[:, None] + OFFSET  # (i, i + OFFSET): the positives
        if SOFTMAX:
            if HAS_ROW:
                G += g_r[:, None] * tl.exp(x - st_r[:, None])
                if HAS_TARGET:
                    G -= tl.where(pos, g_r[:, None], 0.0)
            if HAS_COL:
                st_c = tl.load(STAT_C + cols, mask=cmask, other=0.0)
                G += g_c[None, :] * tl.exp(x - st_c[None, :])
                if HAS_TARGET:
                    G -= tl.where(pos, g_c[None, :], 0.0)
        else:
            if HAS_TARGET:  # d/dx -log sigmoid(z x) = -z sigmoid(-z x), exact at both signs
                sig = tl.where(pos, -tl.sigmoid(-x), tl.sigmoid(x))
            else:
                sig = tl.sigmoid(x)
            if HAS_ROW:
                G += g_r[:, None] * sig
            if HAS_COL:
                G += g_c[None, :] * sig
        # Padding rows/columns may hold 0 * inf = nan before this.
        G = tl.where(rmask[:, None] & cmask[None, :], G, 0.0)
        y = tl.load(
            Y + cols[:, None] * stride_y + feats[None, :],
            mask=cmask[:, None] & fmask[None, :],
            other=0.0,
        )  # (BLOCK_N, BLOCK_D)
        if UPCAST:
            acc = tl.dot(G, y.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(G.to(y.dtype), y, acc, input_precision=PRECISION)
        if WRITE_PART:
            part_s += tl.sum(G * dot, 1)
            part_t += tl.sum(G, 1)
    tl.store(
        DX + rows[:, None] * stride_dx + feats[None, :],
        acc * s,
        mask=rmask[:, None] & fmask[None, :],
    )
    if WRITE_PART:
        first = rmask & (pid_d == 0)
        tl.store(PART + rows * 2, part_s, mask=first)
        tl.store(PART + rows * 2 + 1, part_t, mask=first)
