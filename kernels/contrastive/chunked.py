"""Tiled contrastive statistics in plain PyTorch: the CPU path, O(B*d + chunk^2) memory.

Both primitives walk the (R, C) logit matrix x = scale * a @ b.T + bias in chunk x chunk tiles
and never hold more than one tile. `fwd` returns per-row and/or per-column statistics:
  softmax: log-sum-exp of x over the columns (rows) / rows (columns),
  sigmoid: sum of softplus(x) over the columns (rows) / rows (columns).
`bwd` recomputes every tile and, for upstream gradients g_row (R,) and g_col (C,) of those
statistics, forms G = dLoss/dx tile by tile:
  softmax: G_ij = g_row_i exp(x_ij - lse_row_i) + g_col_j exp(x_ij - lse_col_j),
  sigmoid: G_ij = (g_row_i + g_col_j) sigmoid(x_ij),
then dA = scale * G @ b, dB = scale * G.T @ a, dscale = sum(G * a @ b.T), dbias = sum(G).
Targets (the positive pairs) are not part of these statistics: the loss adds them in O(R*d).
Inputs of any float dtype are computed in fp32; everything returned is fp32.
"""

from __future__ import annotations

import torch


def fwd(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    kind: str,
    rows: bool = True,
    cols: bool = False,
    chunk: int = 1024,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    a32, b32 = a.float(), b.float()  # (R, D), (C, D)
    s, t = scale.float(), bias.float()
    R, C = a32.shape[0], b32.shape[0]
    softmax = kind == "softmax"
    init = float("-inf") if softmax else 0.0
    row = torch.full((R,), init, device=a.device) if rows else None
    col = torch.full((C,), init, device=a.device) if cols else None
    for i0 in range(0, R, chunk):
        ai = a32[i0 : i0 + chunk]
        for j0 in range(0, C, chunk):
            x = torch.mm(ai, b32[j0 : j0 + chunk].T).mul_(s)  # (ci, cj)
            if softmax:
                if row is not None:
                    r = row[i0 : i0 + chunk]
                    torch.logaddexp(r, torch.logsumexp(x, 1), out=r)
                if col is not None:
                    c = col[j0 : j0 + chunk]
                    torch.logaddexp(c, torch.logsumexp(x, 0), out=c)
            else:
                sp = torch.nn.functional.softplus(x.add_(t))
                if row is not None:
                    row[i0 : i0 + chunk] += sp.sum(1)
                if col is not None:
                    col[j0 : j0 + chunk] += sp.sum(0)
    return row, col


def bwd(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    kind: str,
    row_stat: torch.Tensor | None,
    g_row: torch.Tensor | None,
    col_stat: torch.Tensor | None,
    g_col: torch.Tensor | None,
    chunk: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a32, b32 = a.float(), b.float()  # (R, D), (C, D)
    s, t = scale.float(), bias.float()
    R, C = a32.shape[0], b32.shape[0]
    softmax = kind == "softmax"
    da, db = torch.zeros_like(a32), torch.zeros_like(b32)
    # Scalar gradients accumulate in fp64: they sum R*C terms.
    ds = torch.zeros((), dtype=torch.float64, device=a.device)
    dt = torch.zeros((), dtype=torch.float64, device=a.device)
    for i0 in range(0, R, chunk):
        ai = a32[i0 : i0 + chunk]
        for j0 in range(0, C, chunk):
            bj = b32[j0 : j0 + chunk]
            dot = torch.mm(ai, bj.T)  # (ci, cj)
            x = torch.mul(dot, s)
            if softmax:
                G = None
                if g_row is not None:
                    G = x.sub(row_stat[i0 : i0 + chunk, None]).exp_()
                    G.mul_(g_row[i0 : i0 + chunk, None])
                if g_col is not None:
                    P = x.sub_(col_stat[None, j0 : j0 + chunk]).exp_()
                    P.mul_(g_col[None, j0 : j0 + chunk])
                    G = P if G is None else G.add_(P)
            else:
                w = 0.0
                if g_row is not None:
                    w = g_row[i0 : i0 + chunk, None]
                if g_col is not None:
                    w = w + g_col[None, j0 : j0 + chunk]
                G = torch.sigmoid_(x.add_(t)).mul_(w)
            if G is None:
                continue
            da[i0 : i0 + chunk].addmm_(G, bj)
            db[j0 : j0 + chunk].addmm_(G.T, ai)
            ds += torch.dot(G.view(-1), dot.view(-1))
            dt += G.sum()
    return da.mul_(s), db.mul_(s), ds.float(), dt.float()
