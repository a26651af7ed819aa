"""Held-out evaluation: global retrieval and FG-CLIP's fine-grained (hard-negative) accuracy.

- recall@k image->text and text->image for long and short captions over the evaluated set;
- region->phrase recall@1 among all region phrases of the set;
- hard-negative accuracy: a box is right when its true phrase scores above all of its
  attribute-swapped negatives (chance = 1 / (1 + K)), the box-level test FG-CLIP reports.
Embeddings are gathered over the data-parallel group, so every rank returns the same numbers.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fgclip_mega.objective import encode_batch


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows i whose key i is among the k most similar keys; (N, D), (N, D)."""
    sims = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T  # (N, N)
    topk = sims.topk(min(k, sims.shape[1]), dim=1).indices  # (N, k)
    target = torch.arange(sims.shape[0], device=sims.device)[:, None]
    hits = int((topk == target).any(dim=1).sum())
    return hits / sims.shape[0] if len(sims) else float("nan")


def hard_negative_accuracy(region: torch.Tensor, candidates: torch.Tensor) -> float:
    """region (H, D); candidates (H, 1 + K, D) with the true phrase at index 0."""
    if region.shape[0] == 0:
        return float("nan")
    r = F.normalize(region.float(), dim=-1)
    c = F.normalize(candidates.float(), dim=-1)
    scores = torch.einsum("hd,hkd->hk", r, c)  # (H, 1 + K)
    return int((scores.argmax(dim=1) == 0).sum()) / scores.shape[0]


def _gather(x: torch.Tensor, group) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, x.cpu(), group=group)
    return torch.cat(parts).to(x.device)


@torch.no_grad()
def evaluate(model, loader, num_batches: int, dp_group=None, runtime=None) -> dict[str, float]:
    keys = ("image", "long_text", "short_text", "region", "region_text", "hard_region", "hard_text")
    acc: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    device = next(model.parameters()).device
    for _ in range(num_batches):
        batch = next(loader)
        with runtime.autocast() if runtime is not None else contextlib.nullcontext():
            emb = encode_batch(model, batch.to(device), True)
        for k in keys:
            acc[k].append(getattr(emb, k).float())
    e = {k: _gather(torch.cat(v), dp_group) for k, v in acc.items()}
    return {
        "i2t_long_r1": recall_at_k(e["image"], e["long_text"]),
        "t2i_long_r1": recall_at_k(e["long_text"], e["image"]),
        "i2t_short_r1": recall_at_k(e["image"], e["short_text"]),
        "t2i_short_r1": recall_at_k(e["short_text"], e["image"]),
        "region_r1": recall_at_k(e["region"], e["region_text"]),
        "hard_neg_acc": hard_negative_accuracy(e["hard_region"], e["hard_text"]),
        "eval_images": float(e["image"].shape[0]),
        "eval_hard_boxes": float(e["hard_region"].shape[0]),
    }
