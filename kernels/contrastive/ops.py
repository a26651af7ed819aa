"""Autograd wrapper and the contrastive losses built on the tiled statistics.

`pair_stats` is differentiable in a, b, scale and bias; its forward keeps only the O(R + C)
statistics and the inputs, its backward recomputes the tiles (chunked.bwd / launcher.bwd). The
losses add the positive pairs, an O(R * d) term, outside the kernels:
  softmax row cross-entropy_i = lse_row_i - x_{i, i+offset},
  sigmoid: sum_j -log sigmoid(z_ij x_ij) = sum_j softplus(x_ij) - x_{i, i+offset}.
Implementations: "chunked" (PyTorch tiles), "triton" (fused kernels), "naive" (the full logit
matrix through autograd, as OpenCLIP does). Picking one is the caller's job (one dispatch, in
fgclip_mega.losses.dispatch).
"""

from __future__ import annotations

from types import ModuleType

import torch

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


class _PairStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, scale, bias, impl, kind, rows, cols, chunk):
        prims = primitives(impl)
        row, col = prims.fwd(a, b, scale, bias, kind, rows, cols, chunk)
        ctx.prims, ctx.kind, ctx.chunk = prims, kind, chunk
        ctx.save_for_backward(a, b, scale, bias, row, col)
        empty = a.new_empty(0, dtype=torch.float32)
        return (row if rows else empty), (col if cols else empty)

    @staticmethod
    def backward(ctx, g_row, g_col):
        a, b, scale, bias, row, col = ctx.saved_tensors
        g_row = g_row if row is not None else None
        g_col = g_col if col is not None else None
        if g_row is None and g_col is None:
            return (None,) * 9
        da, db, ds, dt = ctx.prims.bwd(
            a, b, scale, bias, ctx.kind, row, g_row, col, g_col, ctx.chunk
        )
        return (
            da.to(a.dtype),
            db.to(b.dtype),
            ds.to(scale.dtype).reshape(scale.shape),
            dt.to(bias.dtype).reshape(bias.shape),
            *(None,) * 5,
        )


def _naive_stats(a, b, scale, bias, kind, rows, cols):
    x = scale * (a.float() @ b.float().T) + bias  # (R, C): the whole matrix, kept by autograd
    if kind == "softmax":
        reduce = lambda dim: torch.logsumexp(x, dim)
    else:
        sp = torch.nn.functional.softplus(x)
        reduce = lambda dim: sp.sum(dim)
    empty = a.new_empty(0, dtype=torch.float32)
    return (reduce(1) if rows else empty), (reduce(0) if cols else empty)


def pair_stats(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kind: str = "softmax",
    rows: bool = True,
    cols: bool = False,
    impl: str = "chunked",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row (R,) and column (C,) statistics of x = scale * a @ b.T + bias, fp32.

    softmax: log-sum-exp; sigmoid: sum of softplus. A direction not asked for is an empty tensor.
    a (R, D), b (C, D) of one float dtype; scale and bias are 0-dim tensors.
    """
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"kind must be softmax or sigmoid, got {kind!r}")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need a (R, D) and b (C, D), got {tuple(a.shape)}, {tuple(b.shape)}")
    scale = torch.as_tensor(scale, dtype=torch.float32, device=a.device)
    if bias is None:
        bias = torch.zeros((), device=a.device)
    bias = torch.as_tensor(bias, dtype=torch.float32, device=a.device)
    if impl == "naive":
        return _naive_stats(a, b, scale, bias, kind, rows, cols)
    primitives(impl)  # validates the name
    return _PairStats.apply(a, b, scale, bias, impl, kind, rows, cols, chunk_size)


def positive_dots(a: torch.Tensor, b: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """a_i . b_{i+offset} in fp32, (R,)."""
    R = a.shape[0]
    if offset < 0 or offset + R > b.shape[0]:
        raise ValueError(f"positives {offset}..{offset + R} fall outside the {b.shape[0]} columns")
    return (a.float() * b[offset : offset + R].float()).sum(-1)


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
    scale = torch.as_tensor(scale, dtype=torch.float32, device=a.device)
    row, col = pair_stats(
        a, b, scale, kind="softmax", rows=True, cols=symmetric, impl=impl, chunk_size=chunk_size
    )
    pos = scale * positive_dots(a, b, offset)  # (R,)
    if symmetric:
        return 0.5 * (row.mean() + col.mean()) - pos.mean()
    return row.mean() - pos.mean()


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
    scale = torch.as_tensor(scale, dtype=torch.float32, device=a.device)
    bias = torch.as_tensor(bias, dtype=torch.float32, device=a.device)
    row, _ = pair_stats(a, b, scale, bias, kind="sigmoid", impl=impl, chunk_size=chunk_size)
    pos = scale * positive_dots(a, b, offset) + bias  # (R,)
    return (row.sum() - pos.sum()) / a.shape[0]
