"""FG-CLIP: two OpenAI-CLIP towers, three projections and three temperatures, tensor-parallel.

The model returns embeddings only (no loss, no data source). Sharded parameters carry megatron's
`tensor_model_parallel` / `partition_dim` / `partition_stride` attributes; sequence-parallel norm
params carry `sequence_parallel`; everything else is replicated over the TP group.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import ColumnParallelLinear
from torch import nn

from fgclip_mega.config import ModelConfig, ParallelConfig
from fgclip_mega.models.attention import resolve_backend
from fgclip_mega.models.layers import CheckpointPolicy, megatron_config, normal_init
from fgclip_mega.models.regions import pool_regions
from fgclip_mega.models.temperatures import Temperatures
from fgclip_mega.models.text import TextTower
from fgclip_mega.models.vision import VisionTower

log = logging.getLogger(__name__)


class FGCLIPModel(Temperatures, nn.Module):
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
        """Builds on `tp_group` (default: megatron's TP group, set up by
        `fgclip_mega.parallel.init_parallel`). The trainer passes the runtime's device, dtypes
        and resolved attention backend (`from_runtime`). Seed the global RNG identically on all
        ranks before building: replicated weights must match over TP."""
        super().__init__()
        if tp_group is None:
            if not ps.model_parallel_is_initialized():
                raise RuntimeError(
                    "FGCLIPModel needs megatron's process groups: call "
                    "fgclip_mega.parallel.init_parallel(...) first"
                )
            tp_group = ps.get_tensor_model_parallel_group()
        tp = tp_group.size()
        if tp != parallel.tensor_parallel_size:
            raise ValueError(
                f"parallel.tensor_parallel_size={parallel.tensor_parallel_size} but "
                f"the TP group has {tp} ranks"
            )
        for name, value in (
            ("model.vision.heads", cfg.vision.heads),
            ("model.vision.mlp_width", cfg.vision.mlp_width),
            ("model.text.heads", cfg.text.heads),
            ("model.text.mlp_width", cfg.text.mlp_width),
            ("model.text.vocab_size", cfg.text.vocab_size),
            ("model.projection_dim", cfg.projection_dim),
        ):
            if value % tp:
                raise ValueError(f"{name}={value} is not divisible by the TP size {tp}")
        device = torch.device(device)
        self.cfg, self.tp_group = cfg, tp_group
        sp = parallel.sequence_parallel and tp > 1
        self.tp_config = megatron_config(tp, sp, params_dtype)
        # Projections act on pooled (B, D) rows that are replicated, never sequence-split.
        proj_config = megatron_config(tp, False, params_dtype)

        compute = compute_dtype or params_dtype
        backend = attention_backend or resolve_backend(cfg.attention_backend, device, compute)
        self.attention_backend = backend
        log.info("attention backend: %s (%s, compute %s)", backend, device, compute)

        ckpt = CheckpointPolicy.from_config(parallel)
        self.vision = VisionTower(cfg.vision, self.tp_config, tp_group, backend, ckpt)
        self.text = TextTower(cfg.text, self.tp_config, tp_group, backend, ckpt)

        def projection(width: int) -> ColumnParallelLinear:
            return ColumnParallelLinear(
                width,
                cfg.projection_dim,
                config=proj_config,
                init_method=normal_init(width**-0.5),
                bias=False,
                gather_output=True,
                tp_group=tp_group,
            )

        self.visual_projection = projection(cfg.vision.width)
        self.text_projection = projection(cfg.text.width)
        self.text_filip_projection = projection(cfg.text.width)  # long captions
        with torch.no_grad():
            self.text_filip_projection.weight.copy_(self.text_projection.weight)
        # fp32 whatever params_dtype is (models/temperatures.py); SigLIP's bias when configured.
        self._init_temperatures(cfg.logit_scale_init, cfg.logit_bias_init)
        # As in CLIP: no weight decay on embeddings and position tables either (the optimizer in
        # fgclip_mega/parallel/wrap.py also skips every param of < 2 dims: norms, biases, scales).
        for p in (
            self.vision.class_embedding,
            self.vision.position_embedding,
            self.text.position_embedding,
            self.text.position_embedding_ori,
            self.text.position_embedding_res,
            self.text.token_embedding.weight,
        ):
            p.no_weight_decay = True
        # Every weight in params_dtype (megatron's layers are built in it; norms, embeddings and
        # the patch conv are cast here), except the fp32 temperatures.
        self._cast_keeping_temperatures(device, params_dtype)

    @classmethod
    def from_runtime(
        cls, cfg: ModelConfig, parallel: ParallelConfig, runtime, tp_group=None
    ) -> FGCLIPModel:
        """Built with a `fgclip_mega.runtime.Runtime`'s device, dtypes and attention backend,
        on `tp_group` (the ParallelState's)."""
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
        self, images: torch.Tensor, with_dense: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """images (B, 3, S, S) -> (B, P) image embeddings (not normalised); with `with_dense`
        also the dense feature map (B, P, g, g) from the same pass."""
        pooled, dense = self.vision(images, with_dense=with_dense)
        emb = self.visual_projection(pooled)[0]  # (B, P)
        if not with_dense:
            return emb
        b, g = images.shape[0], self.cfg.vision.grid_size
        dense = self.visual_projection(dense)[0]  # (B, g*g, P)
        return emb, dense.transpose(1, 2).reshape(b, -1, g, g)

    def dense_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, P, g, g); use encode_image(with_dense=True) to get both at once."""
        return self.encode_image(images, with_dense=True)[1]

    def encode_text(self, tokens: torch.Tensor, long: bool = False) -> torch.Tensor:
        """tokens (B, L) -> (B, P). Short (L <= 77): 77-row table and text_projection. Long
        (L <= 248): the _ori/_res tables and text_filip_projection."""
        pooled = self.text(tokens, long=long)
        proj = self.text_filip_projection if long else self.text_projection
        return proj(pooled)[0]

    def region_embeddings(self, dense: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """dense (B, P, g, g); rois (R, 5) [image index, x1, y1, x2, y2] normalised xyxy
        -> (R, P) fp32, RoIAlign-pooled."""
        return pool_regions(dense, rois)

    def forward(
        self,
        images: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        long_text: torch.Tensor | None = None,
        with_dense: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Whichever inputs are given -> {"image", "dense", "text", "long_text"} embeddings."""
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            if with_dense:
                out["image"], out["dense"] = self.encode_image(images, with_dense=True)
            else:
                out["image"] = self.encode_image(images)
        if text is not None:
            out["text"] = self.encode_text(text)
        if long_text is not None:
            out["long_text"] = self.encode_text(long_text, long=True)
        return out

    # ------------------------------------------------------------------ training helpers


def is_tp_sharded(param: nn.Parameter) -> bool:
    """True for a parameter split over TP ranks (count it once per rank in norms/sizes)."""
    return bool(getattr(param, "tensor_model_parallel", False))
