"""FG-CLIP's fine-grained terms on flat inputs (the objective layer selects the boxes).

L_region: symmetric InfoNCE between the RoIAlign region embeddings and their phrase embeddings,
    over the valid boxes of this rank, scale exp(logit_scale_finegraind).
L_hard: per box that has hard negatives, cross-entropy over [positive phrase, N negative
    phrases] with label 0, mean over those boxes, scale exp(logit_scale_hardneg).
Embeddings are L2-normalised here. A term with no boxes is exactly 0 with zero gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.contrastive import softmax_contrastive_loss, unit_rows


def zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    """Exact 0 connected to every input, with all-zero gradients even if an input holds NaN."""
    return sum(t.reshape(-1)[:0].sum() for t in tensors)


def region_loss(
    region: torch.Tensor,
    phrase: torch.Tensor,
    scale: torch.Tensor,
    *,
    impl: str = "chunked",
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Symmetric InfoNCE of region (K, D) vs phrase (K, D); 0 when K = 0."""
    if region.shape != phrase.shape or region.dim() != 2:
        raise ValueError(f"region {tuple(region.shape)} and phrase {tuple(phrase.shape)} differ")
    if region.shape[0] == 0:
        return zero_loss(region, phrase, scale)
    r, p = unit_rows(region), unit_rows(phrase)  # (K, D) each, normalised in fp32
    return softmax_contrastive_loss(r, p, scale, impl=impl, chunk_size=chunk_size)


def hard_negative_loss(
    region: torch.Tensor,
    candidates: torch.Tensor,
    scale: torch.Tensor,
    negative_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int | torch.Tensor]:
    """Mean over boxes of CE(region (H, D) . candidates (H, 1+N, D), label 0).

    `negative_valid` (H, N) bool marks real negatives; a masked one neither scores nor passes a
    gradient (not even a NaN held in it), and a box with no real negative is left out of the
    mean. Returns (loss, boxes counted): an int without a mask, a device tensor with one.
    """
    h = region.shape[0]
    if candidates.dim() != 3 or candidates.shape[0] != h or candidates.shape[2] != region.shape[1]:
        raise ValueError(
            f"candidates must be (H={h}, 1+N, D={region.shape[-1]}), got {tuple(candidates.shape)}"
        )
    if h == 0:
        return zero_loss(region, candidates, scale), 0
    cand = candidates.float()
    if negative_valid is not None:
        keep = torch.cat([negative_valid.new_ones(h, 1), negative_valid], 1)  # (H, 1+N)
        # Zero masked rows *before* normalising: masked_fill on the logits would still multiply
        # their (zero) gradient by a NaN embedding.
        cand = torch.where(keep[..., None], cand, 0.0)
    cand = F.normalize(cand, dim=-1)  # (H, 1+N, D)
    r = F.normalize(region.float(), dim=-1)
    logits = scale * torch.einsum("hd,hnd->hn", r, cand)  # (H, 1+N)
    target = torch.zeros(h, dtype=torch.long, device=r.device)
    if negative_valid is None:
        return F.cross_entropy(logits, target), h
    logits = logits.masked_fill(~keep, float("-inf"))
    counted = negative_valid.any(dim=1)  # (H,) boxes with at least one real negative
    per_box = F.cross_entropy(logits, target, reduction="none") * counted
    n = counted.sum()
    return per_box.sum() / n.clamp(min=1), n
