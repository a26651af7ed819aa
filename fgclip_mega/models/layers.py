"""Pre-norm transformer blocks on megatron-core tensor-parallel layers.

This is where parallelism is applied: q/k/v and fc1 are column-parallel (each TP rank owns a
slice of the heads / MLP width), out_proj and fc2 are row-parallel (their partial sums are
all-reduced, or reduce-scattered along the sequence with sequence parallelism). Activations are
sequence-first, (N, B, D), the layout megatron's sequence-parallel mappings split on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer import TransformerConfig
from torch import nn
from torch.utils.checkpoint import checkpoint

from fgclip_mega.models.attention import attention
from fgclip_mega.models.fused import (  # noqa: F401 - ACTIVATIONS: the NaFlex head's
    ACTIVATIONS,
    BIAS_ACTIVATIONS,
)


def megatron_config(
    tensor_parallel_size: int, sequence_parallel: bool, params_dtype: torch.dtype
) -> TransformerConfig:
    """The one megatron-core config object: the model's TP layers and DDP read it (sizes are
    ours, not megatron's). CPU initialisation builds each full weight from the global RNG and
    slices it, so weights are identical for every TP size given the seed."""
    tp = tensor_parallel_size
    return TransformerConfig(
        # Placeholders: megatron validates them, our towers carry their own sizes.
        num_layers=1,
        hidden_size=64 * tp,
        num_attention_heads=tp,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        use_cpu_initialization=True,
        perform_initialization=True,
    )


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which activations are recomputed in backward instead of kept."""

    enabled: bool = False
    """Any recomputation at all."""
    granularity: str = "block"
    """'block': the whole block (+1 forward of it); 'mlp': only its MLP (the widest tensors)."""
    every: int = 1
    """Only blocks 0, k, 2k, ... are recomputed."""

    @classmethod
    def from_config(cls, parallel) -> CheckpointPolicy:
        return cls(
            parallel.activation_checkpointing,
            parallel.checkpoint_granularity,
            parallel.checkpoint_every,
        )

    def applies(self, index: int, part: str) -> bool:
        return (
            self.enabled
            and torch.is_grad_enabled()
            and index % self.every == 0
            and part == self.granularity
        )


def recompute(fn, *args):
    """Activation checkpointing that recomputes exactly the forward it replaces.

    torch's non-reentrant checkpoint records the autocast state (and the CPU/CUDA RNG) of the
    forward and re-enters it in the recompute; megatron's `checkpoint` does not, so under bf16
    autocast it recomputed in fp32. CLIP has no dropout, so megatron's TP RNG tracker is not
    needed here."""
    return checkpoint(fn, *args, use_reentrant=False)


def normal_init(std: float):
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


class LayerNorm(nn.LayerNorm):
    """A LayerNorm whose output has its weights' dtype, under autocast too.

    CUDA autocast runs layer_norm in fp32 and returns fp32 (CPU autocast leaves it alone): with
    bf16 weights that made the residual stream, the activations saved for backward and the
    sequence-parallel all-gathers fp32. The kernel accumulates in fp32 whatever its dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.weight.dtype)  # a no-op when the stream already has the weights' dtype
        if not torch.is_autocast_enabled(x.device.type):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def layer_norm(width: int, eps: float, sequence_parallel: bool = False) -> LayerNorm:
    """A LayerNorm; under sequence parallelism each TP rank sees only its slice of the tokens,
    so its grads are partial and megatron's finalize_model_grads all-reduces params marked so."""
    norm = LayerNorm(width, eps=eps)
    if sequence_parallel:
        for p in norm.parameters():
            p.sequence_parallel = True
    return norm


class RowParallel(RowParallelLinear):
    """megatron's RowParallelLinear, handing its TP group to the linear function: 0.16.1 passes
    None there, which warns on every call (a host-side cost in eager, a graph break per block
    under torch.compile). The group is only read for SP/dgrad communication, off in this layer."""

    def _forward_impl(self, input, weight, *args, **kwargs):
        kwargs["tp_group"] = self.tp_group
        return super()._forward_impl(input, weight, *args, **kwargs)


class SelfAttention(nn.Module):
    def __init__(
        self,
        width: int,
        heads: int,
        layers: int,
        causal: bool,
        config: ModelParallelConfig,
        tp_group: dist.ProcessGroup,
        backend: str,
    ):
        super().__init__()
        tp = tp_group.size()
        if heads % tp:
            raise ValueError(f"{heads} attention heads are not divisible by TP size {tp}")
        self.heads_local, self.head_dim = heads // tp, width // heads
        self.causal, self.backend = causal, backend
        # One fused projection; the full (3D, D) weight is HF's cat([q; k; v]) and stride=3 gives
        # each rank [q_r; k_r; v_r] (its own heads of each), so one GEMM and one SP all-gather.
        in_std = width**-0.5 * (2 * layers) ** -0.5
        self.qkv = ColumnParallelLinear(
            width,
            3 * width,
            config=config,
            init_method=normal_init(in_std),
            bias=True,
            gather_output=False,
            stride=3,
            tp_group=tp_group,
        )
        self.out_proj = RowParallel(
            width,
            width,
            config=config,
            init_method=normal_init(width**-0.5),
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(N or N/tp, B, D) -> q, k, v each (N, B, H/tp, hd); SP inputs are gathered here.

        Under autocast they come out in the autocast dtype: megatron's linear adds its bias
        outside autocast, which would hand fp32 q/k/v (never flash-eligible) to attention."""
        qkv, _ = self.qkv(x)  # (N, B, 3 * H/tp * hd)
        if torch.is_autocast_enabled(qkv.device.type):
            qkv = qkv.to(torch.get_autocast_dtype(qkv.device.type))
        n, b = qkv.shape[:2]
        return qkv.view(n, b, 3, self.heads_local, self.head_dim).unbind(2)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        n_valid: int,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q, k, v (N, B, H/tp, hd); tokens >= n_valid are sequence-parallel padding and are
        left out of the attention (their output is zero). key_padding_mask (B, n_valid) bool:
        True = a real token (NaFlex images padded to the batch's patch budget)."""
        n, b = q.shape[:2]
        # (B, n, H/tp, hd) views with unit last-dim stride: flash-attn's layout, no copies.
        q, k, v = (t[:n_valid].transpose(0, 1) for t in (q, k, v))
        out = attention(
            q, k, v, causal=self.causal, backend=self.backend, key_padding_mask=key_padding_mask
        )  # (B, n, H/tp, hd)
        out = out.transpose(0, 1).reshape(n_valid, b, -1)  # (n, B, H/tp * hd)
        if n_valid < n:
            out = torch.cat([out, out.new_zeros(n - n_valid, *out.shape[1:])])
        return self.out_proj(out)[0]  # (N or N/tp, B, D)

    def value_path(self, v: torch.Tensor) -> torch.Tensor:
        """Attention with every token attending only to itself: out_proj(v); (N, B, H/tp, hd)."""
        n, b = v.shape[:2]
        return self.out_proj(v.reshape(n, b, -1))[0]


class MLP(nn.Module):
    def __init__(
        self,
        width: int,
        mlp_width: int,
        layers: int,
        config: ModelParallelConfig,
        tp_group: dist.ProcessGroup,
        activation: str = "quick_gelu",
    ):
        super().__init__()
        # fc1 leaves its bias to the activation: one autograd node keeps only the GEMM output
        # for backward (models/fused.py).
        self.bias_act = BIAS_ACTIVATIONS[activation]
        self.fc1 = ColumnParallelLinear(
            width,
            mlp_width,
            config=config,
            init_method=normal_init((2 * width) ** -0.5),
            bias=True,
            gather_output=False,
            skip_bias_add=True,
            tp_group=tp_group,
        )
        self.fc2 = RowParallel(
            mlp_width,
            width,
            config=config,
            init_method=normal_init(width**-0.5 * (2 * layers) ** -0.5),
            bias=True,
            input_is_parallel=True,
            skip_bias_add=False,
            tp_group=tp_group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, bias = self.fc1(x)  # (N, B, F/tp), (F/tp,)
        return self.fc2(self.bias_act(y, bias))[0]


class Block(nn.Module):
    """OpenAI-CLIP residual block: x + attn(ln1(x)), then + mlp(ln2(.))."""

    def __init__(
        self,
        width,
        heads,
        mlp_width,
        layers,
        eps,
        causal,
        config,
        tp_group,
        backend,
        activation: str = "quick_gelu",
    ):
        super().__init__()
        sp = config.sequence_parallel
        self.norm1 = layer_norm(width, eps, sp)
        self.attn = SelfAttention(width, heads, layers, causal, config, tp_group, backend)
        self.norm2 = layer_norm(width, eps, sp)
        self.mlp = MLP(width, mlp_width, layers, config, tp_group, activation)
        self.recompute_mlp = False  # set by Transformer from its CheckpointPolicy

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        if self.recompute_mlp and torch.is_grad_enabled():
            return recompute(lambda t: self.mlp(self.norm2(t)), h)
        return self.mlp(self.norm2(h))

    def forward(
        self,
        x: torch.Tensor,
        n_valid: int,
        with_dense: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (N, B, D) (N/tp under SP). With `with_dense`, also returns the block run with its
        attention replaced by the value path (FG-CLIP's dense features), sharing ln1 and qkv."""
        q, k, v = self.attn.project_qkv(self.norm1(x))
        h = x + self.attn(q, k, v, n_valid, key_padding_mask)
        out = h + self._mlp(h)
        if not with_dense:
            return out
        d = x + self.attn.value_path(v)
        return out, d + self._mlp(d)


class Transformer(nn.Module):
    """A stack of blocks; owns the sequence-parallel split/gather and activation checkpointing."""

    def __init__(
        self,
        width,
        heads,
        mlp_width,
        layers,
        eps,
        causal,
        config,
        tp_group,
        backend,
        checkpointing: CheckpointPolicy,
        activation: str = "quick_gelu",
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            Block(
                width, heads, mlp_width, layers, eps, causal, config, tp_group, backend, activation
            )
            for _ in range(layers)
        )
        for i, block in enumerate(self.blocks):
            block.recompute_mlp = checkpointing.enabled and (
                checkpointing.granularity == "mlp" and i % checkpointing.every == 0
            )
        self.tp_group = tp_group
        self.sequence_parallel = config.sequence_parallel
        self.checkpointing = checkpointing

    def _run(self, i: int, x: torch.Tensor, n_valid: int, with_dense: bool, mask=None):
        block = self.blocks[i]
        if self.checkpointing.applies(i, "block"):
            return recompute(lambda t: block(t, n_valid, with_dense, mask), x)
        return block(x, n_valid, with_dense, mask)

    def forward(
        self,
        x: torch.Tensor,
        with_dense: bool = False,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """x (N, B, D), the same on every TP rank -> (N, B, D); with `with_dense` also the dense
        (value-path) output of the last block. key_padding_mask (B, N) bool, True = real token:
        padded tokens are never attended to (their own outputs are computed and meaningless)."""
        n = x.shape[0]
        if self.sequence_parallel:
            # Pad N to a multiple of the TP size; padding never enters attention.
            tp = self.tp_group.size()
            pad = math.ceil(n / tp) * tp - n
            if pad:
                x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)  # (N/tp, B, D)
        dense = None
        for i in range(len(self.blocks)):
            last = i == len(self.blocks) - 1
            if last and with_dense:
                x, dense = self._run(i, x, n, True, key_padding_mask)
            else:
                x = self._run(i, x, n, False, key_padding_mask)
        outs = [x] if dense is None else [x, dense]
        if self.sequence_parallel:
            # Everything after the tower is replicated over TP, so the backward only splits.
            outs = [
                gather_from_sequence_parallel_region(
                    t, tensor_parallel_output_grad=False, group=self.tp_group
                )[:n]
                for t in outs
            ]
        return outs[0] if dense is None else (outs[0], outs[1])
