"""FG-CLIP 2: SigLIP 2 NaFlex towers, three text heads, dense feature head and four temperatures,
tensor-parallel (upstream `FG_CLIP2_Model`, released as qihoo360/fg-clip2-*).

No projections: the image embedding is the MAP head's output, the text embedding one of three
(D, D) heads on the pooled last-position state: `text_head` (short captions; HF `text_model.head`),
`longtext_head` (long captions, with the long position tables) and `boxtext_head` (region phrases
and hard negatives). Region features are RoIAlign on the dense head's output over each image's
own patch grid. The model returns embeddings only (no loss, no data source).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from torch import nn

from fgclip_mega.config import ModelConfig, ParallelConfig
from fgclip_mega.models.attention import resolve_backend
from fgclip_mega.models.layers import CheckpointPolicy, megatron_config
from fgclip_mega.models.naflex import NaFlexVisionTower, grid_canvas, scale_rois
from fgclip_mega.models.regions import pool_regions
from fgclip_mega.models.siglip2_text import Siglip2TextTower
from fgclip_mega.models.temperatures import Temperatures

log = logging.getLogger(__name__)

TEXT_HEADS = {"short": "text_head", "long": "longtext_head", "box": "boxtext_head"}


class DenseGrid:
    """Dense features of a NaFlex batch laid out for RoIAlign: a (B, D, H, W) canvas and each
    image's (gw/W, gh/H) factors (see naflex.grid_canvas)."""

    def __init__(self, canvas: torch.Tensor, factors: list[tuple[float, float]]):
        self.canvas, self.factors = canvas, factors


class FGCLIP2Model(Temperatures, nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        parallel: ParallelConfig,
        *,
        params_dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
        attention_backend: str | None = None,
        tp_group: dist.ProcessGroup | None = None,
    ):
        super().__init__()
        if tp_group is None:
            if not ps.model_parallel_is_initialized():
                raise RuntimeError(
                    "FGCLIP2Model needs megatron's process groups: call "
                    "fgclip_mega.parallel.init_parallel(...) first"
                )
            tp_group = ps.get_tensor_model_parallel_group()
        tp = tp_group.size()
        if cfg.vision.width != cfg.text.width:
            raise ValueError(
                f"model.text.width={cfg.text.width} must equal model.vision.width="
                f"{cfg.vision.width}: FG-CLIP 2 has no projections"
            )
        for name, value in (
            ("model.vision.heads", cfg.vision.heads),
            ("model.vision.mlp_width", cfg.vision.mlp_width),
            ("model.text.heads", cfg.text.heads),
            ("model.text.mlp_width", cfg.text.mlp_width),
            ("model.text.vocab_size", cfg.text.vocab_size),
        ):
            if value % tp:
                raise ValueError(f"{name}={value} is not divisible by the TP size {tp}")
        device = torch.device(device)
        self.cfg, self.tp_group = cfg, tp_group
        sp = parallel.sequence_parallel and tp > 1
        self.tp_config = megatron_config(tp, sp, params_dtype)
        compute = compute_dtype or params_dtype
        backend = attention_backend or resolve_backend(cfg.attention_backend, device, compute)
        self.attention_backend = backend
        ckpt = CheckpointPolicy.from_config(parallel)
        self.vision = NaFlexVisionTower(cfg.vision, self.tp_config, tp_group, backend, ckpt)
        self.text = Siglip2TextTower(cfg.text, self.tp_config, tp_group, backend, ckpt)
        d = cfg.text.width
        # Three (D, D) heads, replicated; the long and box heads start as copies of the short
        # one (upstream `copy_weight`).
        self.text_head = nn.Linear(d, d)
        self.longtext_head = nn.Linear(d, d)
        self.boxtext_head = nn.Linear(d, d)
        self.longtext_head.load_state_dict(self.text_head.state_dict())
        self.boxtext_head.load_state_dict(self.text_head.state_dict())
        bias = -10.0 if cfg.logit_bias_init is None else cfg.logit_bias_init  # always SigLIP's
        self._init_temperatures(cfg.logit_scale_init, bias)
        for p in (
            self.vision.position_embedding,
            self.text.position_embedding,
            self.text.position_embedding_ori,
            self.text.position_embedding_res,
            self.text.token_embedding.weight,
            self.vision.head.probe,
            self.vision.dense_head.probe,
        ):
            p.no_weight_decay = True
        self._cast_keeping_temperatures(device, params_dtype)

    @classmethod
    def from_runtime(cls, cfg: ModelConfig, parallel: ParallelConfig, runtime, tp_group=None):
        return cls(
            cfg,
            parallel,
            params_dtype=runtime.params_dtype,
            compute_dtype=runtime.compute_dtype,
            device=runtime.device,
            attention_backend=runtime.attention,
            tp_group=tp_group,
        )

    # ------------------------------------------------------------------ forward pieces

    def encode_image(
        self,
        pixels: torch.Tensor,
        valid: torch.Tensor,
        grids: Sequence[tuple[int, int]],
        with_dense: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, DenseGrid]:
        """pixels (B, N, 3*p*p), valid (B, N), grids [(gh, gw)] host ints -> (B, D) embeddings
        (not normalised); with `with_dense` also the dense features as a `DenseGrid`."""
        grids = [(int(h), int(w)) for h, w in grids]
        pooled, dense = self.vision(pixels, valid, grids, with_dense=with_dense)
        if not with_dense:
            return pooled
        return pooled, DenseGrid(*grid_canvas(dense, grids))

    def encode_text(self, tokens: torch.Tensor, kind: str = "short") -> torch.Tensor:
        """tokens (B, L) padded to the full length; kind short | long | box -> (B, D)."""
        if kind not in TEXT_HEADS:
            raise ValueError(f"text kind {kind!r} is not one of {sorted(TEXT_HEADS)}")
        pooled = self.text(tokens, long=kind == "long")
        return getattr(self, TEXT_HEADS[kind])(pooled)

    def region_embeddings(self, dense: DenseGrid, rois: torch.Tensor) -> torch.Tensor:
        """rois (R, 5) [image index, x1, y1, x2, y2] normalised to each image -> (R, D) fp32."""
        return pool_regions(dense.canvas, scale_rois(rois, dense.factors))
