"""Differentiable data-parallel collectives of the global losses.

Every collective goes through `dist.<name>` looked up at call time, so tests can count them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(size, rank) of the data-parallel group; a process without torch.distributed is alone.

    group None is only accepted in a world of one: with tensor parallelism the data-parallel
    group is not the world, so the caller must pass it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    if group is None:
        if dist.get_world_size() > 1:
            raise ValueError("pass the data-parallel process group (group=None is ambiguous)")
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        # x (b, F) on every rank -> (W * b, F), rank-major.
        size, _ = group_size_rank(group)
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((size * x.shape[0], *x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        # Each rank's rows receive the sum over ranks of the gradient they got as columns.
        size, _ = group_size_rank(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // size, *grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_gather_with_grad(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """One all-gather forward, one reduce-scatter (sum) backward."""
    return _AllGather.apply(x, group)


def ring_exchange(
    send: torch.Tensor, recv: torch.Tensor, group: dist.ProcessGroup | None
) -> list[dist.Work]:
    """Starts send -> next rank and recv <- previous rank of the group; returns the requests."""
    size, rank = group_size_rank(group)
    nxt = dist.get_global_rank(group, (rank + 1) % size)
    prv = dist.get_global_rank(group, (rank - 1) % size)
    ops = [
        dist.P2POp(dist.isend, send, nxt, group),
        dist.P2POp(dist.irecv, recv, prv, group),
    ]
    return dist.batch_isend_irecv(ops)


def check_same_shape(x: torch.Tensor, group: dist.ProcessGroup | None, what: str) -> None:
    """Every rank of `group` must hold `x` with the same shape before a gather: gloo aborts the
    process on a size mismatch and NCCL may hang or read garbage. One tiny all-gather of the
    shapes; on GPU the comparison is a device-side assert, so no host sync."""
    size, _ = group_size_rank(group)
    if size == 1:
        return
    # Each size filled in on the device (a kernel argument): torch.tensor(x.shape, device=...)
    # would be a host->device copy, a stream sync on CUDA.
    shape = torch.empty(x.dim(), dtype=torch.int64, device=x.device)  # (ndim,)
    for i, n in enumerate(x.shape):
        shape[i].fill_(n)
    shapes = shape.new_empty(size * shape.numel())
    dist.all_gather_into_tensor(shapes, shape, group=group)
    shapes = shapes.view(size, -1)  # (W, ndim)
    same = (shapes == shape).all()
    if x.device.type != "cpu":
        torch._assert_async(same)
    else:
        _raise_if_different(same, shapes, what)


def _raise_if_different(same: torch.Tensor, shapes: torch.Tensor, what: str) -> None:
    # Host tensors only: the read is free there (host_syncs.CPU_ONLY_CHECKS lists it).
    if not same:
        raise ValueError(
            f"{what}: data-parallel ranks hold different shapes {shapes.tolist()} "
            "(every rank needs the same micro-batch size and feature width)"
        )
