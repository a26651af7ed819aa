"""OpenAI-CLIP image tower (as HF CLIPVisionModel), plus FG-CLIP's dense value-path features."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from fgclip_mega.config import VisionConfig
from fgclip_mega.models.layers import CheckpointPolicy, Transformer, layer_norm


class VisionTower(nn.Module):
    def __init__(
        self,
        cfg: VisionConfig,
        config: ModelParallelConfig,
        tp_group: dist.ProcessGroup,
        backend: str,
        checkpointing: CheckpointPolicy,
    ):
        super().__init__()
        self.cfg = cfg
        d, g = cfg.width, cfg.grid_size
        # Patch embedding, class token and positions are small and replicated on every TP rank.
        self.patch_embed = nn.Conv2d(3, d, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(d) * d**-0.5)
        self.position_embedding = nn.Parameter(torch.randn(g * g + 1, d) * 0.02)
        nn.init.normal_(self.patch_embed.weight, std=0.02)
        self.pre_norm = layer_norm(d, cfg.layer_norm_eps)
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
        )
        self.post_norm = layer_norm(d, cfg.layer_norm_eps)

    def forward(
        self, images: torch.Tensor, with_dense: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images (B, 3, S, S) -> pooled (B, D) = post_norm(class token), and with `with_dense`
        the dense patch-token features (B, g*g, D) after post_norm (row-major grid order)."""
        s = self.cfg.image_size
        if images.dim() != 4 or images.shape[1:] != (3, s, s):
            raise ValueError(f"images must be (B, 3, {s}, {s}), got {tuple(images.shape)}")
        b = images.shape[0]
        x = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # (B, D, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, g*g, D)
        x = torch.cat([self.class_embedding.expand(b, 1, -1).to(x.dtype), x], dim=1)
        x = self.pre_norm(x + self.position_embedding)  # (B, N, D)
        out = self.transformer(x.transpose(0, 1), with_dense=with_dense)  # (N, B, D)
        if not with_dense:
            return self.post_norm(out[0]), None
        x, dense = out
        dense = self.post_norm(dense[1:].transpose(0, 1))  # drop the class token: (B, g*g, D)
        return self.post_norm(x[0]), dense
