"""The FG-CLIP objective: L = L_long + L_short + 0.1 L_region + 0.5 L_hard (weights in LossConfig).

L_long / L_short: global image-text contrastive losses over all data-parallel ranks
    (global_loss.py; softmax InfoNCE or SigLIP per LossConfig.kind), scale exp(logit_scale).
L_region: symmetric InfoNCE between the RoIAlign region embeddings and their phrase embeddings,
    over the valid boxes of this rank, scale exp(logit_scale_finegraind).
L_hard: per box that has hard negatives, cross-entropy over [positive phrase, N negative
    phrases] with label 0, mean over those boxes, scale exp(logit_scale_hardneg).
All embeddings are L2-normalised here; every logit scale is clamped at LossConfig.max_logit_scale
before exp. A term with no boxes is exactly 0 with zero gradients (never NaN).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fgclip_mega.config import LossConfig
from fgclip_mega.losses.dispatch import resolve_implementation
from fgclip_mega.losses.global_loss import global_contrastive_losses
from fgclip_mega.losses.scales import logit_scale_to_scale
from kernels.contrastive import softmax_contrastive_loss


@dataclass
class LossInputs:
    image: torch.Tensor
    """(b, D) projected image embeddings of this rank (not normalised)."""
    long_text: torch.Tensor | None = None
    """(b, D) long-caption embeddings."""
    short_text: torch.Tensor | None = None
    """(b, D) short-caption embeddings."""
    region: torch.Tensor | None = None
    """(b, M, D) RoIAlign region embeddings, or (K, D) already flattened."""
    phrase: torch.Tensor | None = None
    """Region-phrase embeddings, same shape as `region`."""
    box_valid: torch.Tensor | None = None
    """(b, M) bool mask or (b,) box counts (or (K,) bool when flat); None = all boxes valid."""
    hard_negatives: torch.Tensor | None = None
    """(b, M, N, D) or (K, N, D) embeddings of N attribute-swapped negative phrases per box."""
    hard_valid: torch.Tensor | None = None
    """(b, M) or (K,) bool: the box has hard negatives; None = every valid box has them."""
    hard_negative_valid: torch.Tensor | None = None
    """(b, M, N), (K, N) or (H, N) bool: which negatives are real; None = all N."""
    hard_region: torch.Tensor | None = None
    """(H, D) region embeddings of just the boxes with hard negatives (instead of the masks)."""
    hard_text: torch.Tensor | None = None
    """(H, 1 + N, D) for `hard_region`: the positive phrase at index 0, then N negatives."""


@dataclass
class LossOutput:
    total: torch.Tensor
    """Weighted sum of the present terms, a differentiable 0-dim tensor."""
    parts: dict[str, torch.Tensor]
    """Detached 0-dim tensors for logging: the terms, the scales in use and the box counts."""


def _box_mask(valid: torch.Tensor | None, lead: tuple[int, ...], device) -> torch.Tensor:
    """Bool mask over the leading box dims (b, M) or (K,) from a mask, counts or None."""
    if valid is None:
        return torch.ones(lead, dtype=torch.bool, device=device)
    if valid.dtype == torch.bool:
        return valid
    # counts (b,): the first counts[i] of the M slots are boxes, the rest padding
    return torch.arange(lead[-1], device=device)[None, :] < valid[:, None]


def _zero(*tensors: torch.Tensor) -> torch.Tensor:
    # Exact 0 connected to every input, with all-zero gradients even if padding holds NaN.
    return sum(t.reshape(-1)[:0].sum() for t in tensors)


def region_loss(
    region: torch.Tensor,
    phrase: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor | None = None,
    *,
    impl: str = "chunked",
    chunk_size: int = 1024,
) -> tuple[torch.Tensor, int]:
    """Symmetric InfoNCE over the valid boxes of this rank; returns (loss, number of boxes)."""
    lead = region.shape[:-1]
    mask = _box_mask(valid, tuple(lead), region.device)
    r, p = region[mask], phrase[mask]  # (K, D)
    k = r.shape[0]
    if k == 0:
        return _zero(region, phrase, scale), 0
    r, p = F.normalize(r, dim=-1), F.normalize(p, dim=-1)
    return softmax_contrastive_loss(r, p, scale, impl=impl, chunk_size=chunk_size), k


def hard_negative_loss(
    region: torch.Tensor,
    phrase: torch.Tensor,
    negatives: torch.Tensor,
    scale: torch.Tensor,
    valid: torch.Tensor | None = None,
    negative_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Mean over boxes with negatives of CE([pos, neg_1..neg_N], label 0); (loss, boxes)."""
    lead = region.shape[:-1]
    mask = _box_mask(valid, tuple(lead), region.device)
    r, p, n = region[mask], phrase[mask], negatives[mask]  # (K, D), (K, D), (K, N, D)
    k = r.shape[0]
    if k == 0:
        return _zero(region, phrase, negatives, scale), 0
    cand = F.normalize(torch.cat([p[:, None], n], 1).float(), dim=-1)  # (K, 1 + N, D)
    r = F.normalize(r.float(), dim=-1)
    logits = scale * torch.einsum("kd,knd->kn", r, cand)  # (K, 1 + N)
    if negative_valid is not None:
        keep = torch.cat([negative_valid[mask].new_ones(k, 1), negative_valid[mask]], 1)
        logits = logits.masked_fill(~keep, float("-inf"))
    target = torch.zeros(k, dtype=torch.long, device=r.device)
    return F.cross_entropy(logits, target), k


def fgclip_loss(
    inputs: LossInputs,
    logit_scale: torch.Tensor,
    logit_scale_finegraind: torch.Tensor | None,
    logit_scale_hardneg: torch.Tensor | None,
    cfg: LossConfig,
    group=None,
    logit_bias: torch.Tensor | None = None,
) -> LossOutput:
    """FG-CLIP loss of this data-parallel rank (see global_loss.py for the DP convention).

    `group` is the data-parallel process group (None: the default group, or a single process).
    Terms whose inputs are None are left out (stage 1 passes only image and texts).
    """
    impl = resolve_implementation(cfg.implementation, inputs.image.device)
    opts = dict(impl=impl, chunk_size=cfg.chunk_size)
    learn = cfg.learn_temperatures
    parts: dict[str, torch.Tensor] = {}
    total = None

    def add(name: str, weight: float, value: torch.Tensor) -> None:
        nonlocal total
        parts[name] = value.detach()
        total = weight * value if total is None else total + weight * value

    names = [n for n in ("long", "short") if getattr(inputs, f"{n}_text") is not None]
    if names:
        scale = logit_scale_to_scale(logit_scale, cfg.max_logit_scale, learn)
        parts["scale"] = scale.detach()
        bias = None
        if cfg.kind == "sigmoid":
            if logit_bias is None:
                raise ValueError("loss.kind=sigmoid needs logit_bias")
            bias = logit_bias.float().reshape(()) if learn else logit_bias.detach().float()
            parts["bias"] = bias.detach().reshape(())
        texts = [getattr(inputs, f"{n}_text") for n in names]
        losses = global_contrastive_losses(
            inputs.image,
            texts,
            scale,
            bias,
            kind=cfg.kind,
            gather=cfg.gather,
            group=group,
            **opts,
        )
        for n, value in zip(names, losses, strict=True):
            add(n, getattr(cfg, f"{n}_weight"), value)

    if inputs.region is not None:
        if inputs.phrase is None or logit_scale_finegraind is None:
            raise ValueError("region embeddings need phrase embeddings and logit_scale_finegraind")
        scale_fg = logit_scale_to_scale(logit_scale_finegraind, cfg.max_logit_scale, learn)
        parts["scale_finegraind"] = scale_fg.detach()
        value, k = region_loss(inputs.region, inputs.phrase, scale_fg, inputs.box_valid, **opts)
        parts["region_boxes"] = torch.tensor(float(k))
        add("region", cfg.region_weight, value)

    if inputs.hard_text is not None or inputs.hard_negatives is not None:
        if logit_scale_hardneg is None:
            raise ValueError("hard negatives need logit_scale_hardneg")
        scale_h = logit_scale_to_scale(logit_scale_hardneg, cfg.max_logit_scale, learn)
        parts["scale_hardneg"] = scale_h.detach()
        if inputs.hard_text is not None:  # boxes already selected, candidates side by side
            if inputs.hard_region is None:
                raise ValueError("hard_text needs hard_region")
            value, k = hard_negative_loss(
                inputs.hard_region, inputs.hard_text[:, 0], inputs.hard_text[:, 1:], scale_h,
                None, inputs.hard_negative_valid,
            )  # fmt: skip
        else:
            if inputs.region is None or inputs.phrase is None:
                raise ValueError("hard_negatives need region and phrase embeddings")
            lead = tuple(inputs.region.shape[:-1])
            mask = _box_mask(inputs.box_valid, lead, inputs.region.device)
            if inputs.hard_valid is not None:
                mask = mask & inputs.hard_valid
            value, k = hard_negative_loss(
                inputs.region, inputs.phrase, inputs.hard_negatives, scale_h, mask,
                inputs.hard_negative_valid,
            )  # fmt: skip
        parts["hard_boxes"] = torch.tensor(float(k))
        add("hard", cfg.hard_weight, value)

    if total is None:
        raise ValueError("no loss term has inputs")
    parts["loss"] = total.detach()
    return LossOutput(total, parts)


class FGCLIPLoss:
    """`fgclip_loss` with the config and the data-parallel group bound, for the training loop.

    Takes LossInputs or any object with the fields image, long_text, short_text and optionally
    region, region_text (phrases), hard_region, hard_text (the trainer's StepEmbeddings).
    Returns (total, parts) as in LossOutput.
    """

    def __init__(self, cfg: LossConfig, dp_group=None):
        self.cfg = cfg
        self.dp_group = dp_group

    def __call__(
        self,
        emb,
        logit_scale: torch.Tensor,
        logit_scale_region: torch.Tensor | None = None,
        logit_scale_hard: torch.Tensor | None = None,
        logit_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not isinstance(emb, LossInputs):
            emb = LossInputs(
                image=emb.image,
                long_text=emb.long_text,
                short_text=emb.short_text,
                region=getattr(emb, "region", None),
                phrase=getattr(emb, "region_text", None),
                hard_region=getattr(emb, "hard_region", None),
                hard_text=getattr(emb, "hard_text", None),
            )
        out = fgclip_loss(
            emb, logit_scale, logit_scale_region, logit_scale_hard, self.cfg, self.dp_group,
            logit_bias,
        )  # fmt: skip
        return out.total, out.parts
