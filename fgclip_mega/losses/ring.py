"""Ring variant of the global contrastive statistics: no rank ever holds the gathered batch.

The column block P (b, m * D) (this rank's features that other ranks need as columns) travels
around the data-parallel ring. At step k rank r holds the block of rank r - k; the next block is
already on its way (isend/irecv) while the current tiles compute.
Forward (W - 1 exchanges): per requested pair (row tensor X_p, column slot q) the row statistics
of X_p against every rank's slot q are combined (log-add-exp for softmax, sum for sigmoid); the
positive of row i is row i of this rank's own block (step 0, offset 0), as in
kernels.contrastive.ops.pair_losses.
Backward (W - 1 feature exchanges + W gradient exchanges): the blocks go around again; each rank
adds its contribution to the gradient of the block it holds to the partial sum received from the
previous rank and passes it on, overlapping that transfer with the next step's tiles; after W
steps each block's gradient, summed over all ranks, is back with its owner.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fgclip_mega.losses.collectives import group_size_rank, ring_exchange
from kernels.contrastive import positive_logits, primitives, stats_to_losses


@dataclass(frozen=True)
class _RingSpec:
    pairs: tuple[tuple[int, int], ...]
    """(row tensor index, column slot of the block) per statistic."""
    dim: int
    """Feature width D of one slot."""
    kind: str
    impl: str
    chunk: int
    group: object


def _wait(reqs) -> None:
    for req in reqs:
        req.wait()


class _RingStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, scale, bias, block, *rows):
        prims = primitives(spec.impl)
        size, _ = group_size_rank(spec.group)
        stats: list[torch.Tensor | None] = [None] * len(spec.pairs)
        cur = block.detach().contiguous()  # (b, m * D)
        for step in range(size):
            reqs = []
            if step < size - 1:
                nxt = torch.empty_like(cur)
                reqs = ring_exchange(cur, nxt, spec.group)
            cols = cur.split(spec.dim, 1)
            for k, (p, q) in enumerate(spec.pairs):
                # Step 0 is this rank's own block: it holds row i's positive at column i.
                st, _ = prims.fwd(
                    rows[p], cols[q], scale, bias, spec.kind, True, False, spec.chunk,
                    0 if step == 0 else None,
                )  # fmt: skip
                if stats[k] is None:
                    stats[k] = st
                elif spec.kind == "softmax":
                    stats[k] = torch.logaddexp(stats[k], st)
                else:
                    stats[k] = stats[k] + st
            _wait(reqs)
            if reqs:
                cur = nxt
        ctx.spec = spec
        ctx.save_for_backward(scale, bias, block, *rows, *stats)
        own = block.split(spec.dim, 1)
        softmax = spec.kind == "softmax"
        return tuple(
            stats_to_losses(
                spec.kind, st, positive_logits(rows[p], own[q], scale, bias) if softmax else None
            )
            for st, (p, q) in zip(stats, spec.pairs, strict=True)
        )

    @staticmethod
    def backward(ctx, *grads):
        spec = ctx.spec
        prims = primitives(spec.impl)
        size, _ = group_size_rank(spec.group)
        n = len(spec.pairs)
        scale, bias, block, *rest = ctx.saved_tensors
        rows, stats = rest[: len(rest) - n], rest[len(rest) - n :]
        grads = [None if g is None else g.float() for g in grads]
        d_rows = [torch.zeros(r.shape, dtype=torch.float32, device=r.device) for r in rows]
        ds = torch.zeros((), device=block.device)
        dt = torch.zeros((), device=block.device)
        cur = block.detach().contiguous()
        # (requests, send buffer) of the gradient in flight: the buffer must outlive the send.
        acc_in, acc_pending = None, ([], None)
        for step in range(size):
            reqs = []
            if step < size - 1:
                nxt = torch.empty_like(cur)
                reqs = ring_exchange(cur, nxt, spec.group)
            cols = cur.split(spec.dim, 1)
            contrib = torch.zeros(cur.shape, dtype=torch.float32, device=cur.device)  # (b, mD)
            slots = contrib.split(spec.dim, 1)
            for k, (p, q) in enumerate(spec.pairs):
                if grads[k] is None:
                    continue
                da, db, s_, t_ = prims.bwd(
                    rows[p], cols[q], scale, bias, spec.kind, stats[k], grads[k], None, None,
                    spec.chunk, 0 if step == 0 else None,
                )  # fmt: skip
                d_rows[p] += da
                slots[q].add_(db)
                ds += s_
                dt += t_
            if step > 0:
                _wait(acc_pending[0])  # partial gradient of this block from the ranks before
                contrib += acc_in
            acc_in = torch.empty_like(contrib)
            acc_pending = (ring_exchange(contrib, acc_in, spec.group), contrib)
            _wait(reqs)
            if reqs:
                cur = nxt
        _wait(acc_pending[0])  # this rank's own block, with every rank's contribution
        d_block = acc_in.to(block.dtype)
        return (
            None,
            ds.reshape(scale.shape),
            dt.reshape(bias.shape),
            d_block,
            *(d.to(r.dtype) for d, r in zip(d_rows, rows, strict=True)),
        )


def ring_pair_losses(
    rows: list[torch.Tensor],
    block: torch.Tensor,
    pairs: list[tuple[int, int]],
    scale: torch.Tensor,
    bias: torch.Tensor,
    *,
    kind: str,
    impl: str,
    chunk_size: int,
    group,
) -> tuple[torch.Tensor, ...]:
    """Row losses (b,) of rows[p] against all ranks' slot q of `block`, per (p, q) in pairs.

    Same values as kernels.contrastive.pair_losses(rows[p], gathered slot q, offset=rank * b).

    block (b, m * D) holds m column tensors of width D side by side; gradients reach rows, block,
    scale and bias.
    """
    dim = rows[0].shape[1]
    chunk = 1 << 62 if impl == "naive" else chunk_size  # naive: each block is one tile
    spec = _RingSpec(tuple(pairs), dim, kind, impl, chunk, group)
    return _RingStats.apply(spec, scale, bias, block, *rows)
