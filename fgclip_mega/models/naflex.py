"""SigLIP 2 NaFlex image tower (as HF Siglip2VisionModel) with FG-CLIP 2's dense feature head.

Images arrive patchified and padded to the batch's patch budget N (fgclip_mega/data/naflex.py):
pixels (B, N, 3*p*p), valid (B, N) bool and each image's patch grid (gh, gw) as host ints. The
learnt (S, S) position table is resized (bilinear, antialiased, as HF) to each image's grid;
attention masks the padded patches as keys. The pooled embedding is the MAP head's (a learnt
probe attending over the valid patches); the dense features are FG-CLIP 2's `dense_feature_head`
run with every patch as its own query. That head is a copy of the MAP head made when the model is
built or imported from SigLIP 2 (upstream's `copy_dense_feature_head` in `train_fgclip2.py`
`--from_siglip2`); stage 1 does not train it (frozen: family.py), so stage 2 starts from that
copy, as upstream's does. Grids are host ints, so nothing here reads device values back and no
host data is copied to the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import nn

from fgclip_mega.config import VisionConfig
from fgclip_mega.models.layers import ACTIVATIONS, CheckpointPolicy, Transformer, layer_norm


class AttentionPoolingHead(nn.Module):
    """SigLIP's multi-head attention pooling (HF `Siglip2MultiheadAttentionPoolingHead`):
    probe -> MHA over the tokens -> x + mlp(layernorm(x)). Replicated on every TP rank (4 D^2 +
    2 D M weights: ~15M for So400m, small beside the tower)."""

    def __init__(self, width: int, heads: int, mlp_width: int, eps: float, activation: str):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = layer_norm(width, eps)  # keeps the weights' dtype under autocast
        self.fc1 = nn.Linear(width, mlp_width)
        self.fc2 = nn.Linear(mlp_width, width)
        self.act = ACTIVATIONS[activation]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.act(self.fc1(self.layernorm(x))))

    def _attend(self, query, tokens, valid):
        # key_padding_mask: True = ignore; as a float mask so MHA keeps the SDPA fast path.
        ignore = torch.zeros(valid.shape, dtype=query.dtype, device=query.device)
        ignore = ignore.masked_fill(~valid, float("-inf"))  # (B, N)
        return self.attention(query, tokens, tokens, key_padding_mask=ignore, need_weights=False)[0]

    def pool(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, D), valid (B, N) -> (B, D)."""
        probe = self.probe.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return self._finish(self._attend(probe, tokens, valid))[:, 0]

    def dense(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Every token as a query (upstream `get_dense_feature`): (B, N, D) -> (B, N, D)."""
        return self._finish(self._attend(tokens, tokens, valid))


def resize_positions(
    table: torch.Tensor, grids: Sequence[tuple[int, int]], length: int
) -> torch.Tensor:
    """(S*S, D) row-major table -> (B, length, D): each image's grid resized as HF does, padded
    with its first row. One interpolation per distinct grid, then one stack."""
    s = int(round(table.shape[0] ** 0.5))
    d = table.shape[1]
    grid_table = table.reshape(s, s, d).permute(2, 0, 1)[None]  # (1, D, S, S)
    # antialias is not implemented for bf16 on CPU (HF upcasts there too).
    src = grid_table.float() if table.device.type == "cpu" else grid_table
    padded: dict[tuple[int, int], torch.Tensor] = {}
    for gh, gw in dict.fromkeys(grids):
        if gh * gw > length:
            raise ValueError(f"grid {gh}x{gw} has more patches than the batch's {length}")
        resized = F.interpolate(src, size=(gh, gw), mode="bilinear", antialias=True)
        resized = resized.reshape(d, gh * gw).T.to(table.dtype)  # (gh*gw, D)
        pad = resized[:1].expand(length - gh * gw, d)
        padded[(gh, gw)] = torch.cat([resized, pad])
    return torch.stack([padded[g] for g in grids])


class NaFlexVisionTower(nn.Module):
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
        d, p = cfg.width, cfg.patch_size
        side = cfg.image_size // p  # the learnt position table is side x side (base: 16 x 16)
        # Patch embedding and position table are small and replicated on every TP rank.
        self.patch_embedding = nn.Linear(3 * p * p, d)
        self.position_embedding = nn.Parameter(torch.randn(side * side, d) * 0.02)
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
        self.post_norm = layer_norm(d, cfg.layer_norm_eps)
        args = (d, cfg.heads, cfg.mlp_width, cfg.layer_norm_eps, cfg.activation)
        self.head = AttentionPoolingHead(*args)
        self.dense_head = AttentionPoolingHead(*args)
        self.dense_head.load_state_dict(self.head.state_dict())

    def tokens(
        self, pixels: torch.Tensor, valid: torch.Tensor, grids: Sequence[tuple[int, int]]
    ) -> torch.Tensor:
        """pixels (B, N, 3*p*p), valid (B, N), grids [(gh, gw)] * B -> tokens (B, N, D)."""
        p = self.cfg.patch_size
        b, n = valid.shape
        if pixels.shape != (b, n, 3 * p * p) or len(grids) != b:
            raise ValueError(
                f"pixels must be (B={b}, N={n}, {3 * p * p}) with one grid per image, got "
                f"{tuple(pixels.shape)} and {len(grids)} grids"
            )
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, N, D)
        x = x + resize_positions(self.position_embedding, grids, n).to(x.dtype)
        x = self.transformer(x.transpose(0, 1), key_padding_mask=valid)  # (N, B, D)
        return self.post_norm(x.transpose(0, 1))

    def forward(
        self,
        pixels: torch.Tensor,
        valid: torch.Tensor,
        grids: Sequence[tuple[int, int]],
        with_dense: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> pooled (B, D) and, with `with_dense`, dense features (B, N, D) (valid rows only
        are meaningful: image i's first gh*gw rows, row-major over its grid)."""
        x = self.tokens(pixels, valid, grids)
        pooled = self.head.pool(x, valid)
        return pooled, (self.dense_head.dense(x, valid) if with_dense else None)


def grid_canvas(
    dense: torch.Tensor, grids: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, list[tuple[float, float]]]:
    """Dense rows (B, N, C) -> one (B, C, H, W) map holding each image's (gh, gw) grid at the top
    left, H, W the batch's largest; rows/columns past an image's grid repeat its last one, so
    RoIAlign (aligned, adaptive sampling) on the canvas reads exactly what it reads on the image's
    own map (its bilinear taps past the last row clamp to it). Also each image's (gw/W, gh/H):
    normalised boxes scaled by it address the image's grid inside the canvas."""
    h = max(g[0] for g in grids)
    w = max(g[1] for g in grids)
    index: dict[tuple[int, int], torch.Tensor] = {}
    for gh, gw in dict.fromkeys(grids):
        rows = torch.arange(h, device=dense.device).clamp(max=gh - 1)
        cols = torch.arange(w, device=dense.device).clamp(max=gw - 1)
        index[(gh, gw)] = (rows[:, None] * gw + cols[None, :]).reshape(-1)  # (H*W,)
    idx = torch.stack([index[g] for g in grids])  # (B, H*W)
    canvas = dense.gather(1, idx[..., None].expand(-1, -1, dense.shape[-1]))  # (B, H*W, C)
    canvas = canvas.transpose(1, 2).reshape(dense.shape[0], dense.shape[-1], h, w)
    return canvas, [(gw / w, gh / h) for gh, gw in grids]


def scale_rois(rois: torch.Tensor, factors: Sequence[tuple[float, float]]) -> torch.Tensor:
    """rois (R, 5) [image, x1, y1, x2, y2] normalised to each image -> normalised to the canvas.
    Factors become device values by fills (kernel arguments, one per distinct grid), not by a
    host-to-device copy."""
    fill = {f: torch.full((2,), f[0], device=rois.device, dtype=rois.dtype) for f in factors}
    for (_, fy), t in fill.items():
        t[1:].fill_(fy)
    per_image = torch.stack([fill[f] for f in factors])  # (B, 2): (gw/W, gh/H)
    sx, sy = per_image[rois[:, 0].long()].unbind(1)  # (R,)
    return rois * torch.stack([torch.ones_like(sx), sx, sy, sx, sy], dim=1)
