"""One pass of a model over an evaluation loader, gathered over the data-parallel group.

Every rank encodes its own micro-batches; the embeddings and token ids are then gathered to
every rank, de-duplicated by sample id (a loader run for ceil(N / global batch) steps may repeat
a few samples) and put in sample-id order, box slot order inside an image. The result is the
same set, in the same order, whatever the number of data-parallel ranks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fgclip_mega.family import family_of_model

_MAX_SLOTS = 1 << 20  # boxes per image are far fewer: (sample, slot) -> one int64 key


@dataclass
class EvalSet:
    sample_ids: torch.Tensor
    """(N,) int64 sample ids, ascending."""
    image: torch.Tensor
    """(N, P) image embeddings."""
    long_text: torch.Tensor
    """(N, P) long-caption embeddings."""
    short_text: torch.Tensor
    """(N, P) short-caption embeddings."""
    long_tokens: torch.Tensor
    """(N, L_l) long-caption tokens (zero-padded)."""
    short_tokens: torch.Tensor
    """(N, L_s) short-caption tokens."""
    region: torch.Tensor
    """(R, P) region embeddings, image by image (sample-id order), slot order inside."""
    region_text: torch.Tensor
    """(R, P) embeddings of each box's phrase."""
    region_tokens: torch.Tensor
    """(R, L_s) each box's phrase tokens."""
    region_sample: torch.Tensor
    """(R,) int64 sample id of each box."""
    hard_index: torch.Tensor
    """(H,) int64 rows of `region` whose box has hard negatives."""
    hard_text: torch.Tensor
    """(H, 1+K, P) positive phrase (0) and negatives of those boxes."""
    hard_tokens: torch.Tensor
    """(H, 1+K, L_s) their tokens."""
    codec: object = None
    """The family's text codec (data/text_codec.py): reads these tokens back, encodes prompts;
    `collect` sets it from the model and loader."""

    @property
    def hard_region(self) -> torch.Tensor:
        return self.region.index_select(0, self.hard_index)


def _pad_last(t: torch.Tensor, length: int) -> torch.Tensor:
    return F.pad(t, (0, length - t.shape[-1])) if t.shape[-1] < length else t


def _cat_tokens(parts: list[torch.Tensor]) -> torch.Tensor:
    # Texts are trimmed per batch: pad back to a common length (zeros = the padding id).
    length = max(p.shape[-1] for p in parts)
    return torch.cat([_pad_last(p, length) for p in parts])


def _batch_records(batch, emb) -> dict[str, torch.Tensor]:
    ids = batch.sample_ids.cpu()
    rois = batch.region_rois.cpu()
    image_index = rois[:, 0].long()  # (R,)
    # Slot of each box inside its image: boxes are packed image by image in slot order.
    first = torch.searchsorted(image_index, image_index, side="left")
    slot = torch.arange(len(image_index)) - first
    return {
        "sample_ids": ids,
        "image": emb.image.float().cpu(),
        "long_text": emb.long_text.float().cpu(),
        "short_text": emb.short_text.float().cpu(),
        "long_tokens": batch.long_tokens.cpu(),
        "short_tokens": batch.short_tokens.cpu(),
        "region": emb.region.float().cpu(),
        "region_text": emb.region_text.float().cpu(),
        "region_tokens": batch.region_tokens.cpu(),
        "region_sample": ids[image_index],
        "region_slot": slot,
        "hard_flag": torch.zeros(len(image_index), dtype=torch.bool).index_fill_(
            0, batch.hard_rows.cpu(), True
        ),
        "hard_text": emb.hard_text.float().cpu(),
        "hard_tokens": batch.hardneg_tokens.cpu(),
    }


def _merge(records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    token_keys = ("long_tokens", "short_tokens", "region_tokens", "hard_tokens")
    out = {}
    for key in records[0]:
        parts = [r[key] for r in records]
        out[key] = _cat_tokens(parts) if key in token_keys else torch.cat(parts)
    return out


def _gather_records(local: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return local
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, local, group=group)
    return _merge(parts)


def _first_occurrences(key: torch.Tensor) -> torch.Tensor:
    """Rows holding the first occurrence of each distinct key, in ascending key order."""
    uniq, inverse = torch.unique(key, return_inverse=True)
    rows = torch.full((len(uniq),), len(key), dtype=torch.int64)
    return rows.scatter_reduce(0, inverse, torch.arange(len(key)), reduce="amin")


def _ordered(m: dict[str, torch.Tensor], codec=None) -> EvalSet:
    first = _first_occurrences(m["sample_ids"])  # (N,) image rows, ascending sample id
    # A repeated image repeats its boxes (same slots): keep each (sample, slot) once.
    box_rows = _first_occurrences(m["region_sample"] * _MAX_SLOTS + m["region_slot"])  # (R,)
    # hard_text rows belong to the flagged boxes, in box order.
    hard_of_box = torch.full((len(m["region_sample"]),), -1, dtype=torch.int64)
    flagged = m["hard_flag"].nonzero()[:, 0]
    hard_of_box[flagged] = torch.arange(len(flagged))
    kept_hard = hard_of_box[box_rows]
    has_hard = kept_hard >= 0
    return EvalSet(
        sample_ids=m["sample_ids"][first],
        image=m["image"][first],
        long_text=m["long_text"][first],
        short_text=m["short_text"][first],
        long_tokens=m["long_tokens"][first],
        short_tokens=m["short_tokens"][first],
        region=m["region"][box_rows],
        region_text=m["region_text"][box_rows],
        region_tokens=m["region_tokens"][box_rows],
        region_sample=m["region_sample"][box_rows],
        hard_index=has_hard.nonzero()[:, 0],
        hard_text=m["hard_text"][kept_hard[has_hard]],
        hard_tokens=m["hard_tokens"][kept_hard[has_hard]],
        codec=codec,
    )


@torch.no_grad()
def collect(model, loader, num_batches: int, dp_group=None, runtime=None) -> EvalSet:
    """Encodes `num_batches` micro-batches of this rank (regional forward: boxes and hard
    negatives too) and gathers the whole set to every rank of `dp_group`."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    fam = family_of_model(model)
    encode, codec = fam.encode, fam.text_codec(model, loader)
    records = []
    try:
        for _ in range(num_batches):
            batch = next(loader).to(device)
            ctx = runtime.autocast() if runtime is not None else contextlib.nullcontext()
            with ctx:
                emb = encode(model, batch, True)
            records.append(_batch_records(batch, emb))
    finally:
        model.train(was_training)
    return _ordered(_gather_records(_merge(records), dp_group), codec)


__all__ = ["EvalSet", "collect"]
