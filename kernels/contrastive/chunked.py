"""Tiled contrastive statistics in plain PyTorch: the CPU path, O(B*d + chunk^2) memory.

Both primitives walk the (R, C) logit matrix x = scale * a @ b.T + bias in tiles of at most
chunk^2 logits and never hold more than one tile: chunk x chunk for large R, and for few rows
(a data-parallel rank's b local rows against the gathered columns) all R rows x chunk^2 / R
columns, so that rectangular shapes do not run many small tiles. With `offset` set, entry
(i, i + offset) is row i's positive (column j's positive is row j - offset); offset None means
the block holds no positives.
`fwd` returns per-row and/or per-column statistics:
  softmax: log-sum-exp of x over the columns (rows) / rows (columns), positives included;
  sigmoid: sum of -log sigmoid(z x), z = +1 at the positives and -1 elsewhere (the loss itself).
`bwd` recomputes every tile and, for upstream gradients g_row (R,) and g_col (C,) of the row and
column losses (softmax: lse - x_positive; sigmoid: the statistic), forms G = dLoss/dx:
  softmax: G_ij = g_row_i (exp(x_ij - lse_row_i) - [j is i's positive])
                + g_col_j (exp(x_ij - lse_col_j) - [i is j's positive]),
  sigmoid: G_ij = (g_row_i + g_col_j) * (sigmoid(x_ij) at negatives, -sigmoid(-x_ij) at positives),
then dA = scale * G @ b, dB = scale * G.T @ a, dscale = sum(G * a @ b.T), dbias = sum(G).
Inputs of any float dtype are computed in fp32; everything returned is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _lse(x: torch.Tensor, dim: int) -> torch.Tensor:
    # Same value as torch.logsumexp (finite inputs), measured ~1.5x faster on CPU tiles.
    m = x.amax(dim, keepdim=True)
    return x.sub(m).exp_().sum(dim).log_().add_(m.squeeze(dim))


def tile_shape(R: int, chunk: int) -> tuple[int, int]:
    """(rows, columns) of one tile: at most chunk^2 logits."""
    rs = max(1, min(R, chunk))
    return rs, max(chunk, chunk * chunk // rs)


def _diag(i0: int, ni: int, j0: int, nj: int, offset: int | None, device):
    """(tile rows, tile cols) of the positives (i, i + offset) inside a tile, or None."""
    if offset is None:
        return None
    lo, hi = max(i0, j0 - offset), min(i0 + ni, j0 + nj - offset)
    if lo >= hi:
        return None
    i = torch.arange(lo, hi, device=device)
    return i - i0, i + offset - j0


def fwd(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    kind: str,
    rows: bool = True,
    cols: bool = False,
    chunk: int = 1024,
    offset: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    a32, b32 = a.float(), b.float()  # (R, D), (C, D)
    s, t = scale.float(), bias.float()
    R, C = a32.shape[0], b32.shape[0]
    softmax = kind == "softmax"
    init = float("-inf") if softmax else 0.0
    row = torch.full((R,), init, device=a.device) if rows else None
    col = torch.full((C,), init, device=a.device) if cols else None
    rs, cs = tile_shape(R, chunk)
    for i0 in range(0, R, rs):
        ai = a32[i0 : i0 + rs]
        for j0 in range(0, C, cs):
            x = torch.mm(ai, b32[j0 : j0 + cs].T).mul_(s).add_(t)  # (ci, cj)
            if softmax:
                if row is not None:
                    r = row[i0 : i0 + rs]
                    torch.logaddexp(r, _lse(x, 1), out=r)
                if col is not None:
                    c = col[j0 : j0 + cs]
                    torch.logaddexp(c, _lse(x, 0), out=c)
                continue
            sp = F.softplus(x)  # -log sigmoid(-x): every pair a negative...
            diag = _diag(i0, x.shape[0], j0, x.shape[1], offset, a.device)
            if diag is not None:  # ...but the positives, -log sigmoid(x)
                sp[diag] = F.softplus(-x[diag])
            if row is not None:
                row[i0 : i0 + rs] += sp.sum(1)
            if col is not None:
                col[j0 : j0 + cs] += sp.sum(0)
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
    offset: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    a32, b32 = a.float(), b.float()  # (R, D), (C, D)
    s, t = scale.float(), bias.float()
    R, C = a32.shape[0], b32.shape[0]
    softmax = kind == "softmax"
    da, db = torch.zeros_like(a32), torch.zeros_like(b32)
    # Scalar gradients accumulate in fp64: they sum R*C terms.
    ds = torch.zeros((), dtype=torch.float64, device=a.device)
    dt = torch.zeros((), dtype=torch.float64, device=a.device)
    if g_row is None and g_col is None:
        return da, db, ds.float(), dt.float()
    rs, cs = tile_shape(R, chunk)
    for i0 in range(0, R, rs):
        ai = a32[i0 : i0 + rs]
        gr = g_row[i0 : i0 + rs, None] if g_row is not None else None  # (ci, 1)
        for j0 in range(0, C, cs):
            bj = b32[j0 : j0 + cs]
            gc = g_col[None, j0 : j0 + cs] if g_col is not None else None  # (1, cj)
            dot = torch.mm(ai, bj.T)  # (ci, cj)
            x = torch.mul(dot, s).add_(t)
            diag = _diag(i0, x.shape[0], j0, x.shape[1], offset, a.device)
            if softmax:
                G = None
                if gr is not None:
                    G = x.sub(row_stat[i0 : i0 + rs, None]).exp_().mul_(gr)
                if gc is not None:
                    P = x.sub_(col_stat[None, j0 : j0 + cs]).exp_().mul_(gc)
                    G = P if G is None else G.add_(P)
                if diag is not None:
                    w = 0.0
                    if gr is not None:
                        w = gr[diag[0], 0]
                    if gc is not None:
                        w = w + gc[0, diag[1]]
                    G[diag] -= w
            else:
                w = gr if gc is None else (gc if gr is None else gr + gc)
                G = torch.sigmoid(x)
                if diag is not None:
                    G[diag] = -torch.sigmoid(-x[diag])
                G.mul_(w)
            da[i0 : i0 + rs].addmm_(G, bj)
            db[j0 : j0 + cs].addmm_(G.T, ai)
            ds += torch.dot(G.view(-1), dot.view(-1))
            dt += G.sum()
    return da.mul_(s), db.mul_(s), ds.float(), dt.float()
