"""megatron-core's multi-tensor fallbacks, made free of host syncs.

Without apex or Transformer Engine (the case here and on clusters that cannot build apex),
megatron-core 0.16.1 clips gradients with `local_multi_tensor_l2_norm`, which builds
`torch.tensor([...])` from one 0-dim norm per parameter (a host read each: 67 device syncs per
step for the tiny model, hundreds for ViT-B/16) on the default device, then reads the result
back once more; `local_multi_tensor_scale` scales through a temporary per tensor. The versions
here use torch's foreach kernels and leave the result on the device; megatron still reads the
total norm once (its API returns a float). Installed only where megatron uses its fallbacks.

Also: megatron DDP reduces the gradient buffer over the data-parallel group even when that group
has one rank (an AVG all-reduce, i.e. a divide by 1 over the whole buffer, plus the collective's
fixed cost). `single_rank_grad_sync` skips the collective there; the buffer is bitwise what the
collective would leave.
"""

from __future__ import annotations

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm: ((1,) fp32 total norm on the device, None)."""
    tensors = tensor_lists[0]
    norms = torch._foreach_norm(tensors)  # one 0-dim norm per tensor, on its device
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for amp_C.multi_tensor_scale: dst = src * scale for each pair."""
    src, dst = tensor_lists
    if all(s is d for s, d in zip(src, dst, strict=True)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


class _Done:
    """A finished collective's handle (what finish_grad_sync waits on when overlapping)."""

    def wait(self) -> None:
        return None


def _single_rank_grad_sync(original):
    def start_grad_sync(self, force_all_reduce: bool | None = False):
        cfg = self.ddp_config
        group = (
            self.intra_distributed_optimizer_instance_group
            if cfg.use_distributed_optimizer
            else self.data_parallel_group
        )
        if (
            group.size() > 1
            or cfg.num_distributed_optimizer_instances > 1
            or cfg.check_for_nan_in_grad
            or cfg.check_for_large_grads
        ):
            return original(self, force_all_reduce)
        if self.is_first_batch and self.grad_reduce_handle is not None:
            return None
        for bucket in self.buckets:  # as megatron scales before its collective
            if bucket.gradient_scaling_factor != 1.0:
                bucket.grad_data *= bucket.gradient_scaling_factor
        # SUM or AVG over one rank leaves the buffer (and a one-shard reduce-scatter's shard,
        # which is the whole buffer) as it is.
        self.grad_reduce_handle = _Done() if cfg.overlap_grad_reduce else None
        return None

    start_grad_sync._fgclip_original = original
    return start_grad_sync


def install() -> bool:
    """Replaces megatron's local fallbacks (idempotent); False when apex/TE kernels are in use.
    The single-rank gradient sync is installed in every case."""
    from megatron.core import utils
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup
    from megatron.core.optimizer import clip_grads, optimizer

    if not hasattr(_ParamAndGradBucketGroup.start_grad_sync, "_fgclip_original"):
        _ParamAndGradBucketGroup.start_grad_sync = _single_rank_grad_sync(
            _ParamAndGradBucketGroup.start_grad_sync
        )
    installed = False
    if clip_grads.l2_norm_impl in (utils.local_multi_tensor_l2_norm, foreach_l2_norm):
        clip_grads.l2_norm_impl = foreach_l2_norm
        installed = True
    for module in (clip_grads, optimizer):
        if module.multi_tensor_scale_impl in (utils.local_multi_tensor_scale, foreach_scale):
            module.multi_tensor_scale_impl = foreach_scale
            installed = True
    return installed
