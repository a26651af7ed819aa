"""The FG-CLIP objective as a list of loss terms: L = sum_t weight_t * L_t.

Each `LossTerm` names its log key, the stage that adds it, the model temperature that scales its
logits and how it is computed. Global terms (image vs a text field, contrasted over every
data-parallel rank) share one feature gather per step; every other term is a function of the
micro-batch's `Embeddings`. Adding a term (e.g. one of FG-CLIP 2's) is one entry in `TERMS`,
with its weight read from `LossConfig.<name>_weight` when that field exists.

Temperatures live on the model (`FGCLIPModel.temperatures()`): they are clamped at
`LossConfig.max_logit_scale` before exp and, with loss.kind=sigmoid, the global terms add the
model's learnable `logit_bias` (SigLIP).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fgclip_mega.config import LossConfig
from fgclip_mega.losses import global_contrastive_losses, hard_negative_loss, region_loss
from fgclip_mega.losses.fgclip2 import (
    fine_grained_textual_loss,
    text_intra_contrast_loss,
    update_margin,
)
from fgclip_mega.losses.scales import logit_scale_to_scale
from fgclip_mega.objective.embeddings import Embeddings


@dataclass(frozen=True)
class TermContext:
    cfg: LossConfig
    """Loss settings."""
    impl: str
    """Contrastive-loss implementation resolved by the runtime."""
    dp_group: object = None
    """Data-parallel group of the terms that keep a DP-wide running state (FG-CLIP 2's CMR)."""
    state: dict = field(default_factory=dict)
    """Running loss state kept on the device between steps (FG-CLIP 2: 'cmr_margin')."""


TermFn = Callable[[Embeddings, torch.Tensor, TermContext], tuple[torch.Tensor, int | torch.Tensor]]


@dataclass(frozen=True)
class LossTerm:
    name: str
    """Log key; the weight is LossConfig.<name>_weight when that field exists."""
    temperature: str | None
    """Model temperature (log scale) that scales this term's logits; None = unscaled."""
    regional: bool
    """Added only in the regional stage (stage 2)."""
    default_weight: float = 1.0
    """Weight when LossConfig has no <name>_weight field."""
    text: str | None = None
    """Global term: the Embeddings text field contrasted with the images over all DP ranks."""
    fn: TermFn | None = None
    """Local term: (embeddings, scale, context) -> (loss, items counted)."""

    def weight(self, cfg: LossConfig) -> float:
        return getattr(cfg, f"{self.name}_weight", self.default_weight)


def _region(emb: Embeddings, scale: torch.Tensor, ctx: TermContext):
    value = region_loss(
        emb.region, emb.region_text, scale, impl=ctx.impl, chunk_size=ctx.cfg.chunk_size
    )
    return value, emb.region.shape[0]


def _hard(emb: Embeddings, scale: torch.Tensor, ctx: TermContext):
    return hard_negative_loss(emb.hard_region, emb.hard_text, scale, emb.hard_valid)


def _tic(emb: Embeddings, scale: None, ctx: TermContext):
    c = ctx.cfg
    return text_intra_contrast_loss(emb.region_text, c.tic_top_k, c.tic_duplicate_threshold)


def _fgt(emb: Embeddings, scale: torch.Tensor, ctx: TermContext):
    c = ctx.cfg
    margin = ctx.state.get("cmr_margin")
    if margin is None:  # upstream starts its threshold at 0
        margin = ctx.state["cmr_margin"] = torch.zeros((), device=emb.hard_region.device)
    loss, counted, statistic = fine_grained_textual_loss(
        emb.hard_region,
        emb.hard_text,
        scale,
        margin,
        emb.hard_valid,
        all_texts_weight=c.fgt_all_texts_weight,
        pair_weight=c.fgt_pair_weight,
        cmr_weight=c.cmr_weight,
    )
    # The step's loss used the margin of the previous step, as upstream does.
    update_margin(margin, statistic, c.cmr_max_margin, ctx.dp_group)
    return loss, counted


TERMS: tuple[LossTerm, ...] = (
    LossTerm("long", "logit_scale", regional=False, text="long_text"),
    LossTerm("short", "logit_scale", regional=False, text="short_text"),
    LossTerm("region", "logit_scale_finegraind", regional=True, default_weight=0.1, fn=_region),
    LossTerm("hard", "logit_scale_hardneg", regional=True, default_weight=0.5, fn=_hard),
)

# FG-CLIP 2 (upstream fgclip2.py): the global terms are SigLIP's sigmoid loss (loss.kind=sigmoid),
# 'region' is its FGV InfoNCE (code weight 0.2: the fgclip2 presets set loss.region_weight), TIC
# pushes distinct region phrases apart and FGT replaces the 1+N-way hard-negative term.
FGCLIP2_TERMS: tuple[LossTerm, ...] = (
    *TERMS[:3],
    LossTerm("tic", None, regional=True, default_weight=0.1, fn=_tic),
    LossTerm("fgt", "logit_scale_hardneg", regional=True, default_weight=0.5, fn=_fgt),
)

RECIPE_TERMS = {"fgclip": TERMS, "fgclip2": FGCLIP2_TERMS}


def log_name(temperature: str) -> str:
    """logit_scale -> scale, logit_scale_hardneg -> scale_hardneg, logit_bias -> bias."""
    return temperature.removeprefix("logit_")


@dataclass
class ObjectiveOutput:
    total: torch.Tensor
    """Weighted sum of the terms, a differentiable 0-dim fp32 tensor."""
    parts: dict[str, torch.Tensor]
    """Detached 0-dim tensors on the loss device: each term, the scales in use, 'loss'."""
    counts: dict[str, int | torch.Tensor]
    """Items each local term averaged over (e.g. region boxes), for logging."""


class Objective:
    """The FG-CLIP loss of one data-parallel rank for one stage.

    `dp_group` is the data-parallel process group the global terms gather over (None: a single
    process). Global terms follow global_loss.py's convention, so averaging gradients over DP
    ranks (DDP) gives the single-process gradient.
    """

    def __init__(
        self,
        cfg: LossConfig,
        *,
        regional: bool,
        impl: str = "chunked",
        dp_group=None,
        terms: tuple[LossTerm, ...] | None = None,
    ):
        self.cfg, self.dp_group = cfg, dp_group
        self.ctx = TermContext(cfg, impl, dp_group)
        terms = RECIPE_TERMS[cfg.recipe] if terms is None else terms
        self.terms = tuple(t for t in terms if regional or not t.regional)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """Running loss state between steps (device tensors), for checkpoints."""
        return self.ctx.state

    def _scaled_temperatures(self) -> list[str]:
        return [n for n in dict.fromkeys(t.temperature for t in self.terms) if n is not None]

    def temperature_names(self) -> list[str]:
        names = self._scaled_temperatures()
        if self.cfg.kind == "sigmoid":
            names.append("logit_bias")
        return names

    def __call__(self, emb: Embeddings, temperatures: dict[str, torch.Tensor]) -> ObjectiveOutput:
        cfg, learn = self.cfg, self.cfg.learn_temperatures
        missing = [n for n in self.temperature_names() if n not in temperatures]
        if missing:
            raise ValueError(f"the objective needs the model temperatures {missing}")
        scales = {
            n: logit_scale_to_scale(temperatures[n], cfg.max_logit_scale, learn)
            for n in self._scaled_temperatures()
        }
        parts = {log_name(n): s.detach() for n, s in scales.items()}
        values: dict[str, torch.Tensor] = {}
        counts: dict[str, int | torch.Tensor] = {}

        global_terms = [t for t in self.terms if t.text is not None]
        by_scale: dict[str, list[LossTerm]] = {}
        for t in global_terms:
            by_scale.setdefault(t.temperature, []).append(t)
        bias = None
        if cfg.kind == "sigmoid":
            raw = temperatures["logit_bias"]
            bias = (raw if learn else raw.detach()).float().reshape(())
            parts["bias"] = bias.detach().clone()  # the param changes in place at the step
        for name, group in by_scale.items():
            # One gather of the image features (and the texts) for all terms on this scale.
            losses = global_contrastive_losses(
                emb.image,
                [getattr(emb, t.text) for t in group],
                scales[name],
                bias,
                kind=cfg.kind,
                impl=self.ctx.impl,
                chunk_size=cfg.chunk_size,
                gather=cfg.gather,
                group=self.dp_group,
            )
            values.update({t.name: v for t, v in zip(group, losses, strict=True)})
        for t in self.terms:
            if t.fn is not None:
                scale = scales.get(t.temperature) if t.temperature is not None else None
                values[t.name], counts[t.name] = t.fn(emb, scale, self.ctx)

        total = sum(t.weight(cfg) * values[t.name].float() for t in self.terms)
        # Temperatures no active term uses (stage 1: the region and hard-negative scales; all of
        # them with learn_temperatures=false, which detaches them) join with a zero term:
        # megatron DDP's overlapped reduction starts a bucket only once every parameter in it
        # has a gradient (CUDA's default; without this such runs stopped at step 2).
        used = set(self.temperature_names()) if learn else set()
        for name, t in temperatures.items():
            if name not in used and t.requires_grad:
                total = total + 0.0 * t.float().sum()
        parts.update({n: v.detach().float().reshape(()) for n, v in values.items()})
        parts["loss"] = total.detach()
        return ObjectiveOutput(total, parts, counts)
