"""FG-CLIP 2's fine-grained terms on flat inputs (upstream `fgclip2.py`, read for each formula).

TIC (textual intra-modal contrast, upstream `hard_category_contrastive_loss`): over this rank's
    region phrases t (K, D), normalised, the cosine matrix t t^T with its diagonal and every entry
    above `duplicate_threshold` (near-duplicate phrases) set to 0; each row keeps its top-k values
    v and contributes log(sum_j exp(v_j)); the loss is the mean over rows. No temperature: it
    pushes distinct phrases apart. Upstream needs K >= k (topk raises otherwise, and its
    `try: ... except: pass` then drops every fine-grained loss of the step); here a row keeps
    min(k, K) values.
FGT (fine-grained textual hard negatives, upstream `hard_contrastive_total_loss`), per box with
    its positive phrase p and negatives n_1..n_N, all at scale s = exp(logit_scale_hardneg):
    all_texts_weight * contrast  (box i vs [every box's positive, every box's negatives], and
                                  positive i vs every box, each a CE with label i; averaged)
  + pair_weight * CE over [p, n_1..n_N] with label 0 (the 1+N-way term)
  + cmr_weight * mean relu(tau + s r.n_j - s r.p) (cross-modal rank margin; mean over the real
    negatives; tau in logit units).
tau is a running margin (upstream `thresholds`): after each step it becomes the data-parallel
    mean of (mean s r.p - mean s r.n) over the ranks' boxes, clamped to [0, max_margin]; a rank
    without boxes contributes its current tau. It stays on the device (upstream reads it back
    with `.item()` every step): one all-reduce per step, whatever the DP size.
Masked negatives (`negative_valid`) neither score nor pass gradients; a box with no real
negative leaves the 1+N-way and CMR means. A term with no boxes is exactly 0 with zero gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fgclip_mega.losses.collectives import group_size_rank
from fgclip_mega.losses.fgclip import zero_loss


def text_intra_contrast_loss(
    phrases: torch.Tensor, top_k: int = 10, duplicate_threshold: float = 0.95
) -> tuple[torch.Tensor, int]:
    """TIC of phrase embeddings (K, D); returns (loss, K)."""
    if phrases.dim() != 2:
        raise ValueError(f"phrases must be (K, D), got {tuple(phrases.shape)}")
    k = phrases.shape[0]
    if k == 0:
        return zero_loss(phrases), 0
    t = F.normalize(phrases.float(), dim=-1)
    sim = t @ t.T  # (K, K)
    drop = torch.eye(k, dtype=torch.bool, device=t.device) | (sim > duplicate_threshold)
    sim = sim.masked_fill(drop, 0.0)
    values = sim.topk(min(top_k, k), dim=1).values  # (K, k)
    return torch.logsumexp(values, dim=1).mean(), k


def fine_grained_textual_loss(
    region: torch.Tensor,
    candidates: torch.Tensor,
    scale: torch.Tensor,
    margin: torch.Tensor,
    negative_valid: torch.Tensor | None = None,
    *,
    all_texts_weight: float = 0.6,
    pair_weight: float = 3.0,
    cmr_weight: float = 0.4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """FGT of region (H, D) vs candidates (H, 1+N, D) [positive, negatives...].

    Returns (loss, boxes counted in the 1+N-way term, this rank's margin statistic
    mean(s r.p) - mean(s r.n) as a detached 0-dim tensor, or `margin` itself without boxes).
    """
    h = region.shape[0]
    if candidates.dim() != 3 or candidates.shape[0] != h or candidates.shape[2] != region.shape[1]:
        raise ValueError(
            f"candidates must be (H={h}, 1+N, D={region.shape[-1]}), got {tuple(candidates.shape)}"
        )
    n = candidates.shape[1] - 1
    if h == 0:
        return zero_loss(region, candidates, scale), region.new_zeros((), dtype=torch.long), margin
    if negative_valid is None:
        negative_valid = torch.ones(h, n, dtype=torch.bool, device=region.device)
    keep = torch.cat([negative_valid.new_ones(h, 1), negative_valid], 1)  # (H, 1+N)
    # Zero masked rows before normalising so a NaN held in one cannot reach a gradient.
    cand = F.normalize(torch.where(keep[..., None], candidates.float(), 0.0), dim=-1)
    r = F.normalize(region.float(), dim=-1)  # (H, D)
    pos_text, neg_text = cand[:, 0], cand[:, 1:]  # (H, D), (H, N, D)
    target = torch.arange(h, device=r.device)

    # Box i against every positive and every real negative of the rank, and the reverse.
    texts = torch.cat([pos_text, neg_text.reshape(h * n, -1)])  # (H + H*N, D)
    columns_ok = torch.cat([negative_valid.new_ones(h), negative_valid.reshape(-1)])
    per_image = (scale * r @ texts.T).masked_fill(~columns_ok, float("-inf"))  # (H, H + H*N)
    per_text = scale * pos_text @ r.T  # (H, H)
    contrast = (F.cross_entropy(per_image, target) + F.cross_entropy(per_text, target)) / 2

    logits = scale * torch.einsum("hd,hnd->hn", r, cand)  # (H, 1+N)
    pos, neg = logits[:, 0], logits[:, 1:]  # (H,), (H, N)
    counted = negative_valid.any(dim=1)  # (H,)
    n_counted = counted.sum()
    pair = F.cross_entropy(
        logits.masked_fill(~keep, float("-inf")), torch.zeros_like(target), reduction="none"
    )
    pair = (pair * counted).sum() / n_counted.clamp(min=1)

    n_neg = negative_valid.sum()
    violation = torch.relu(margin + neg - pos[:, None])  # (H, N)
    cmr = torch.where(negative_valid, violation, 0.0).sum() / n_neg.clamp(min=1)

    with torch.no_grad():
        neg_mean = torch.where(negative_valid, neg, 0.0).sum() / n_neg.clamp(min=1)
        statistic = torch.where(n_neg > 0, pos.mean() - neg_mean, margin)
    loss = all_texts_weight * contrast + pair_weight * pair + cmr_weight * cmr
    return loss, n_counted, statistic


@torch.no_grad()
def update_margin(
    margin: torch.Tensor, statistic: torch.Tensor, max_margin: float, group=None
) -> None:
    """margin <- clamp(DP-mean of the ranks' statistics, 0, max_margin), in place, on device."""
    size, _ = group_size_rank(group)
    value = statistic.detach().float().reshape(1).clone()
    if size > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
        value = value / size
    margin.copy_(value.reshape(margin.shape).clamp(0.0, max_margin))
