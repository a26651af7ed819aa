"""Autograd wrapper and the contrastive losses built on the tiled statistics.

`pair_losses` is differentiable in a, b, scale and bias; its forward keeps only the O(R + C)
statistics and the inputs, its backward recomputes the tiles (chunked.bwd / launcher.bwd), where
the positive pairs (i, i + offset) get their label:
  softmax row cross-entropy_i = lse_row_i - x_{i, i+offset} (the O(R d) positive term is
      subtracted outside the kernel),
  sigmoid row loss_i = sum_j -log sigmoid(z_ij x_ij) (z = +1 at the positive, in the kernel).
Implementations: "chunked" (PyTorch tiles), "triton" (fused kernels), "naive" (the full logit
matrix through autograd, as OpenCLIP does). Picking one is the caller's job (one dispatch, in
fgclip_mega.losses.dispatch).
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.nn.functional as F

from kernels.contrastive import chunked

IMPLEMENTATIONS = ("naive", "chunked", "triton")


def primitives(impl: str) -> ModuleType:
    """Module with `fwd` / `bwd` for tile-wise use (the ring loss); naive = one whole tile."""
    if impl == "triton":
        from kernels.contrastive import launcher

        return launcher
    if impl in ("chunked", "naive"):
        return chunked
    raise ValueError(f"unknown contrastive implementation {impl!r}; choose from {IMPLEMENTATIONS}")


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows L2-normalised in fp32, returned in x's dtype: one rounding of the unit vector. (For
    bf16, F.normalize would round the norm to bf16 first: every row off unit length by up to
    2^-9, i.e. a per-row temperature error of ~0.2 at scale 100.)"""
    return F.normalize(x.float(), dim=-1).to(x.dtype)


def positive_logits(a, b, scale, bias, offset: int = 0) -> torch.Tensor:
    """x_{i, i+offset} = scale * a_i . b_{i+offset} + bias in fp32, (R,); no autograd."""
    R = a.shape[0]
    if offset < 0 or offset + R > b.shape[0]:
        raise ValueError(f"positives {offset}..{offset + R} fall outside the {b.shape[0]} columns")
    return scale * (a.float() * b[offset : offset + R].float()).sum(-1) + bias


def stats_to_losses(kind: str, stat: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Row losses from a primitive's statistic: softmax lse - x_positive; sigmoid already is."""
    return stat - pos if kind == "softmax" else stat


class _PairLosses(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, impl, kind, offset, rows, cols, chunk):
        prims = primitives(impl)
        row, col = prims.fwd(a, b, scale, bias, kind, rows, cols, chunk, offset)
        pos = positive_logits(a, b, scale, bias, offset) if kind == "softmax" else None  # (R,)
        ctx.prims, ctx.kind, ctx.offset, ctx.chunk = prims, kind, offset, chunk
        ctx.save_for_backward(a, b, scale, bias, row, col)
        empty = a.new_empty(0, dtype=torch.float32)
        return (
            stats_to_losses(kind, row, pos) if rows else empty,
            stats_to_losses(kind, col, pos) if cols else empty,
        )

    @staticmethod
    def backward(ctx, g_row, g_col):
        a, b, scale, bias, row, col = ctx.saved_tensors
        # The positives' -1 (softmax) or exact -sigmoid(-x) (sigmoid) is applied inside the
        # tiles, so the nearly cancelling parts of a gradient combine in fp32.
        da, db, ds, dt = ctx.prims.bwd(
            a, b, scale, bias, ctx.kind,
            row, g_row.float() if row is not None else None,
            col, g_col.float() if col is not None else None,
            ctx.chunk, ctx.offset,
        )  # fmt: skip
        return (
            da.to(a.dtype),
            db.to(b.dtype),
            ds.to(scale.dtype).reshape(scale.shape),
            dt.to(bias.dtype).reshape(bias.shape),
            *(None,) * 6,
        )


def _naive_losses(a, b, scale, bias, kind, offset, rows, cols):
    x = scale * (a.float() @ b.float().T) + bias  # (R, C): the whole matrix, kept by autograd
    R = a.shape[0]
    i = torch.arange(R, device=x.device)
    if kind == "softmax":
        pos = x[i, i + offset]
        reduce = lambda dim: torch.logsumexp(x, dim) - pos
    else:
        z = -torch.ones_like(x)
        z[i, i + offset] = 1.0
        sp = torch.nn.functional.softplus(-z * x)  # -log sigmoid(z x)
        reduce = lambda dim: sp.sum(dim)
    empty = a.new_empty(0, dtype=torch.float32)
    return (reduce(1) if rows else empty), (reduce(0) if cols else empty)


def pair_losses(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kind: str = "softmax",
    offset: int = 0,
    rows: bool = True,
    cols: bool = False,
    impl: str = "chunked",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (R,) and per-column (C,) losses of x = scale * a @ b.T + bias, fp32.

    Row i's positive is column i + offset. softmax: row_i = lse_j(x_ij) - x_{i,i+offset}
    (cross-entropy); sigmoid: row_i = sum_j softplus(x_ij) - x_{i,i+offset} (= sum_j of
    -log sigmoid(z_ij x_ij)). Columns (the b -> a direction) need R == C and offset 0. A
    direction not asked for is an empty tensor. a (R, D), b (C, D) of one float dtype; scale and
    bias are 0-dim tensors.
    """
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"kind must be softmax or sigmoid, got {kind!r}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need a (R, D) and b (C, D), got {tuple(a.shape)}, {tuple(b.shape)}")
    if cols and (a.shape[0] != b.shape[0] or offset != 0):
        raise ValueError("column losses need a square batch and offset 0")
    if offset < 0 or offset + a.shape[0] > b.shape[0]:
        raise ValueError(f"positives {offset}..{offset + a.shape[0]} fall outside the columns")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=a.device)
    if bias is None:
        bias = torch.zeros((), device=a.device)
    bias = torch.as_tensor(bias, dtype=torch.float32, device=a.device)
    if impl == "naive":
        return _naive_losses(a, b, scale, bias, kind, offset, rows, cols)
    primitives(impl)  # validates the name
    return _PairLosses.apply(a, b, scale, bias, impl, kind, offset, rows, cols, chunk_size)


def softmax_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    *,
    offset: int = 0,
    symmetric: bool = True,
    impl: str = "chunked",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """InfoNCE, the same value as reference.softmax_contrastive_reference, fp32 scalar.

    Rows a (R, D) against columns b (C, D), row i's positive at column i + offset, mean over rows;
    symmetric (R == C, offset 0) averages it with the column (b -> a) direction.
    """
    if symmetric and (a.shape[0] != b.shape[0] or offset != 0):
        raise ValueError("symmetric InfoNCE needs a square batch and offset 0")
    row, col = pair_losses(
        a,
        b,
        scale,
        kind="softmax",
        offset=offset,
        rows=True,
        cols=symmetric,
        impl=impl,
        chunk_size=chunk_size,
    )
    return 0.5 * (row.mean() + col.mean()) if symmetric else row.mean()


def sigmoid_contrastive_loss(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    offset: int = 0,
    impl: str = "chunked",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """SigLIP, the same value as reference.sigmoid_contrastive_reference, fp32 scalar."""
    row, _ = pair_losses(
        a, b, scale, bias, kind="sigmoid", offset=offset, impl=impl, chunk_size=chunk_size
    )
    return row.mean()
