"""The token table's lookup, with its gradient added straight into megatron's gradient buffer.

A plain lookup's backward builds a dense, zero-filled (V, D) gradient (V = 49408 rows) per call,
and megatron's DDP hook then adds it into the parameter's `main_grad`: two full passes over the
table per text stream per step, for a gradient that touches a few thousand rows. Here the
backward index-adds the rows into `main_grad` and hands autograd one dummy gradient per
backward pass (so that the DDP hook still fires, and skips its add) — megatron's own
gradient-accumulation fusion for linear layers, applied to the embedding. Measured on the tiny
preset's CPU stage-1 step (run/bench_step.py, same settings): 63.4 -> 53.2 ms.

On CUDA `index_add_` accumulates with atomics: the order of the sum over repeated tokens is not
fixed (the same as flash-attn's backward). Without a `main_grad` (eval, a module not wrapped by
megatron DDP) the backward returns the usual dense gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel import VocabParallelEmbedding
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region


class _LookupIntoMainGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(ids)
        ctx.weight = weight
        return F.embedding(ids, weight)  # (..., D)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ids,) = ctx.saved_tensors
        weight = ctx.weight
        main_grad = getattr(weight, "main_grad", None)
        if main_grad is None:
            dense = torch.ops.aten.embedding_dense_backward(grad, ids, weight.shape[0], -1, False)
            return None, dense
        rows = grad.reshape(-1, grad.shape[-1]).to(main_grad.dtype)  # (tokens, D)
        main_grad.index_add_(0, ids.reshape(-1), rows)
        weight.grad_added_to_main_grad = True
        # One dummy per backward pass, whichever lookup's backward runs first: autograd would
        # sum several (a full pass each); its AccumulateGrad runs the DDP hook after all of
        # them. Never read (the hook sees grad_added_to_main_grad and drops it).
        task = torch._C._current_graph_task_id()
        if getattr(weight, "_dummy_grad_task", None) == task:
            return None, None
        weight._dummy_grad_task = task
        return None, torch.empty_like(weight)


class TokenEmbedding(VocabParallelEmbedding):
    """megatron's vocabulary-parallel table (rows split over TP, lookups all-reduced) with the
    lookup above."""

    def forward(self, input_: torch.Tensor) -> torch.Tensor:
        tp = self.tp_group.size()
        if self.reduce_scatter_embeddings or self.deterministic_mode:
            return super().forward(input_)
        if tp > 1:
            outside = (input_ < self.vocab_start_index) | (input_ >= self.vocab_end_index)
            local = (input_ - self.vocab_start_index).masked_fill(outside, 0)
        else:
            local = input_
        out = _LookupIntoMainGrad.apply(local, self.weight)  # (..., D)
        if tp > 1:
            out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_model_parallel_region(out, group=self.tp_group)
