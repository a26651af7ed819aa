"""The micro-batch every loader returns, and the image normalisation both loaders share."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Batch:
    images: torch.Tensor
    """(B, 3, H, W) float32, squashed to H = W = image size, CLIP mean/std normalised."""
    long_tokens: torch.Tensor
    """(B, long_context) int64 caption tokens, zero-padded, EOT-terminated."""
    short_tokens: torch.Tensor
    """(B, short_context) int64 'a photo of ' + short caption tokens."""
    boxes: torch.Tensor
    """(B, M, 4) float32 normalised xyxy; rows >= box_counts are zero."""
    box_counts: torch.Tensor
    """(B,) int64 valid boxes per image (<= max_boxes)."""
    region_tokens: torch.Tensor
    """(B, M, short_context) int64 region phrase per box (short or long expr, see region_text)."""
    hardneg_tokens: torch.Tensor
    """(B, M, 1+K, short_context) int64: index 0 the box's short_expr, 1..K its negatives."""
    hardneg_valid: torch.Tensor
    """(B, M) bool: the box is valid and has K hard negatives."""
    sample_ids: torch.Tensor
    """(B,) int64 global sample ids (index order), on the CPU."""
    keys: list[str]
    """Sample keys (the records' f_path)."""
    epoch: int
    """Epoch of the first sample (a batch may straddle an epoch boundary)."""

    def box_mask(self) -> torch.Tensor:
        """(B, M) True for the valid (non-padding) boxes."""
        m = self.boxes.shape[1]
        return torch.arange(m, device=self.box_counts.device)[None, :] < self.box_counts[:, None]

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            keep = f.name == "sample_ids" or not isinstance(v, torch.Tensor)
            moved[f.name] = v if keep else v.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def __len__(self) -> int:
        return len(self.keys)


def batch_from_arrays(images: torch.Tensor, arrays: dict, keys: list[str]) -> Batch:
    """Assembles a Batch from SampleSource-style arrays (numpy or torch), casting ids to int64."""

    def t(name: str, dtype: torch.dtype) -> torch.Tensor:
        v = arrays[name]
        v = v if isinstance(v, torch.Tensor) else torch.from_numpy(v)
        return v.to(dtype)

    return Batch(
        images=images,
        long_tokens=t("long_tokens", torch.int64),
        short_tokens=t("short_tokens", torch.int64),
        boxes=t("boxes", torch.float32),
        box_counts=t("box_counts", torch.int64),
        region_tokens=t("region_tokens", torch.int64),
        hardneg_tokens=t("hardneg_tokens", torch.int64),
        hardneg_valid=t("hardneg_valid", torch.bool),
        sample_ids=t("sample_ids", torch.int64).cpu(),
        keys=keys,
        epoch=int(arrays["epoch"]),
    )
