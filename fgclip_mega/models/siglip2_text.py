"""SigLIP 2 text tower (as HF Siglip2TextModel) with FG-CLIP 2's long-caption position tables.

SigLIP pads every text to its full length and pools the LAST position's final-norm state (no
attention mask, no causal mask: the model was trained attending to its padding), so texts are
never cut here. Short texts (captions, region phrases, hard negatives; 64 tokens) read the
64-row table; long captions (196) read `position_embedding_ori` below `long_position_split` and
`position_embedding_res` from there, both initialised as v1's keep-20 stretch of the short table
(upstream `resize_postion_embeding`). The text head is applied by the model (three copies).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from fgclip_mega.config import TextConfig
from fgclip_mega.models.embedding import TokenEmbedding
from fgclip_mega.models.layers import CheckpointPolicy, Transformer, normal_init
from fgclip_mega.models.text import _check_token_ids, stretch_positions


class Siglip2TextTower(nn.Module):
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
        self.token_embedding = TokenEmbedding(
            cfg.vocab_size, d, init_method=normal_init(0.02), config=config, tp_group=tp_group
        )
        self.position_embedding = nn.Parameter(torch.randn(cfg.short_context, d) * 0.02)
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
            causal=False,
            config=config,
            tp_group=tp_group,
            backend=backend,
            checkpointing=checkpointing,
            activation=cfg.activation,
        )
        self.final_norm = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def positions(self, n: int, long: bool) -> torch.Tensor:
        limit = self.cfg.long_context if long else self.cfg.short_context
        if n != limit:
            kind = "long" if long else "short"
            raise ValueError(
                f"{kind} texts must be padded to {limit} tokens (SigLIP pools the last "
                f"position), got {n}"
            )
        if not long:
            return self.position_embedding
        split = self.cfg.long_position_split
        is_ori = torch.arange(n, device=self.position_embedding_ori.device)[:, None] < split
        return torch.where(is_ori, self.position_embedding_ori, self.position_embedding_res)

    def forward(self, tokens: torch.Tensor, long: bool = False) -> torch.Tensor:
        """tokens (B, L) padded to the full length -> final-norm state of the last position."""
        _check_token_ids(tokens, self.cfg.vocab_size)
        x = self.token_embedding(tokens) + self.positions(tokens.shape[1], long)  # (B, L, D)
        x = self.transformer(x.transpose(0, 1))  # (L, B, D)
        return self.final_norm(x[-1])
