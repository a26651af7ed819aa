"""OpenAI-CLIP text tower (as HF CLIPTextModel) with FG-CLIP's long-caption position tables."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from fgclip_mega.config import TextConfig
from fgclip_mega.models.embedding import TokenEmbedding
from fgclip_mega.models.layers import CheckpointPolicy, Transformer, layer_norm, normal_init


def stretch_positions(old: torch.Tensor, keep: int, new_len: int) -> torch.Tensor:
    """Long-CLIP stretch of a (S, D) position table to (new_len, D); with S=77, keep=20, 248:
    rows 0..19 are copied; for i = 0..55, k = 0..3:
    new[20+4i+k] = (1-k/4) old[20+i] + (k/4) old[21+i]  (i=55 reads old[75], old[76]);
    rows 244..247 extrapolate: new[244+k] = old[76] + k (old[76] - old[75]) / 4.
    In general r = (new_len - keep) / (S - keep) new rows per old row, which must be whole."""
    s = old.shape[0]
    r, rem = divmod(new_len - keep, s - keep)
    if rem or r < 1:
        raise ValueError(
            f"cannot stretch {s} positions to {new_len} keeping {keep}: "
            f"({new_len}-{keep}) is not a multiple of ({s}-{keep})"
        )
    frac = torch.arange(r, dtype=old.dtype, device=old.device)[:, None] / r  # (r, 1)
    a, b = old[keep : s - 1], old[keep + 1 : s]  # (S-keep-1, D) left/right neighbours
    inner = (1 - frac) * a[:, None] + frac * b[:, None]  # (S-keep-1, r, D)
    tail = old[s - 1] + frac * (old[s - 1] - old[s - 2])  # (r, D)
    return torch.cat([old[:keep], inner.flatten(0, 1), tail])


def _check_token_ids(tokens: torch.Tensor, vocab_size: int) -> None:
    # megatron's vocab-parallel lookup embeds ids outside a rank's rows as zeros, so at TP >= 2
    # an id >= vocab_size would silently become a zero vector. On GPU a device-side assert
    # (no host sync); on CPU a clear error.
    ok = ((tokens >= 0) & (tokens < vocab_size)).all()
    if tokens.device.type != "cpu":
        torch._assert_async(ok)
    elif not ok:
        bad = tokens[(tokens < 0) | (tokens >= vocab_size)]
        raise ValueError(
            f"text token ids must be in [0, model.text.vocab_size={vocab_size}); "
            f"got {bad[:8].tolist()} (min {int(tokens.min())}, max {int(tokens.max())})"
        )


class TextTower(nn.Module):
    causal = True
    """OpenAI CLIP's text transformer is causal (SigLIP's is not: siglip2_text.py)."""

    def __init__(
        self,
        cfg: TextConfig,
        config: ModelParallelConfig,
        tp_group: dist.ProcessGroup,
        backend: str,
        checkpointing: CheckpointPolicy,
    ):
        super().__init__()
        self.cfg = cfg
        d = cfg.width
        # The (49408, D) table is split by vocabulary rows over TP; lookups are all-reduced.
        self.token_embedding = TokenEmbedding(
            cfg.vocab_size, d, init_method=normal_init(0.02), config=config, tp_group=tp_group
        )
        self.position_embedding = nn.Parameter(torch.randn(cfg.short_context, d) * 0.02)
        # Long captions: positions < long_position_split read `_ori`, the rest `_res`; both start
        # as the stretched short table (FG-CLIP / Long-CLIP).
        long = stretch_positions(
            self.position_embedding.detach(), cfg.long_position_split, cfg.long_context
        )
        self.position_embedding_ori = nn.Parameter(long.clone())
        self.position_embedding_res = nn.Parameter(long.clone())
        self.transformer = Transformer(
            d,
            cfg.heads,
            cfg.mlp_width,
            cfg.layers,
            cfg.layer_norm_eps,
            causal=self.causal,
            config=config,
            tp_group=tp_group,
            backend=backend,
            checkpointing=checkpointing,
            activation=cfg.activation,
        )
        self.final_norm = layer_norm(d, cfg.layer_norm_eps)

    def positions(self, n: int, long: bool) -> torch.Tensor:
        """(n, D) position embeddings of a caption of n tokens."""
        limit = self.cfg.long_context if long else self.cfg.short_context
        if n > limit:
            kind = "long" if long else "short"
            raise ValueError(f"{kind} text has {n} tokens, more than its {limit} positions")
        if not long:
            return self.position_embedding[:n]
        split = self.cfg.long_position_split
        is_ori = torch.arange(n, device=self.position_embedding_ori.device)[:, None] < split
        return torch.where(is_ori, self.position_embedding_ori[:n], self.position_embedding_res[:n])

    def forward(self, tokens: torch.Tensor, long: bool = False) -> torch.Tensor:
        """tokens (B, L) int -> final_norm of the hidden state at each row's first end-of-text
        token, (B, D). A row without one (a caption cut at L) pools its last token."""
        b, n = tokens.shape
        _check_token_ids(tokens, self.cfg.vocab_size)
        x = self.token_embedding(tokens) + self.positions(n, long)  # (B, L, D)
        x = self.transformer(x.transpose(0, 1))  # (L, B, D)
        is_eos = tokens == self.cfg.eos_token_id
        first = is_eos.int().argmax(dim=1)  # first occurrence; 0 when there is none
        first = torch.where(is_eos.any(dim=1), first, n - 1)
        return self.final_norm(x[first, torch.arange(b, device=x.device)])
