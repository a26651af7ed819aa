"""The micro-batch every loader returns, its host-side assembly, and the image normalisation.

The loaders' sources deliver per-sample padded arrays (a fixed shape per sample is what DALI
transports); `batch_from_arrays` packs them once on the host into the layout the model takes:
the valid boxes of the batch as one (R, 5) RoI table with their phrases, the boxes that have hard
negatives as row indices into it, and every token array cut to the batch's longest text.

Text trimming: the text tower is causal and pools at each row's first end-of-text token, so the
positions after the batch's last EOT cannot change any output; cutting there (rounded up to a
multiple of `length_multiple`, default 8, capped at the context) only drops work. Coarser
multiples bound the number of distinct text shapes (`parallel.compile_blocks` compiles each
once). A row without an EOT (only possible in hand-made input) pools at its last position, so
such an array is left at full length.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from fgclip_mega.data.schema import OUTPUT_NAMES
from fgclip_mega.data.tokenizer import EOT_ID

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRIM_MULTIPLE = 8


@dataclass
class Batch:
    images: torch.Tensor
    """(B, 3, H, W) float32, squashed to H = W = image size, CLIP mean/std normalised."""
    long_tokens: torch.Tensor
    """(B, L_l) int64 caption tokens, zero-padded; L_l <= long_context (trimmed, see above)."""
    short_tokens: torch.Tensor
    """(B, L_s) int64 'a photo of ' + short caption tokens; L_s <= short_context."""
    box_counts: torch.Tensor
    """(B,) int64 valid boxes per image (<= max_boxes)."""
    region_rois: torch.Tensor
    """(R, 5) float32 [image index, x1, y1, x2, y2] normalised, image by image in slot order."""
    region_tokens: torch.Tensor
    """(R, L_s) int64 phrase of each box (short or long expr, see DataConfig.region_text)."""
    hard_rows: torch.Tensor
    """(H,) int64 rows of region_rois whose box has K hard negatives, ascending."""
    hardneg_tokens: torch.Tensor
    """(H, 1+K, L_s) int64: index 0 the box's short_expr, 1..K its negatives."""
    sample_ids: torch.Tensor
    """(B,) int64 global sample ids (index order), always on the CPU."""
    keys: list[str]
    """Sample keys (the records' f_path)."""
    epoch: int
    """Epoch of the first sample (a batch may straddle an epoch boundary)."""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> Batch:
        device = torch.device(device)
        # A non_blocking copy from pageable memory is synchronous: pin first so it overlaps.
        pin = non_blocking and device.type == "cuda"
        moved = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "sample_ids" or not isinstance(v, torch.Tensor) or v.device == device:
                moved[f.name] = v
                continue
            if pin and v.device.type == "cpu" and not v.is_pinned():
                v = v.pin_memory()
            moved[f.name] = v.to(device, non_blocking=non_blocking)
        return Batch(**moved)

    def __len__(self) -> int:
        return len(self.keys)


def trimmed_length(tokens: list[torch.Tensor], context: int, multiple: int = TRIM_MULTIPLE) -> int:
    """Common length for token arrays (..., L): through the last EOT, rounded up to `multiple`,
    <= context."""
    last = 0
    for t in tokens:
        rows = t.reshape(-1, t.shape[-1])
        if rows.shape[0] == 0:
            continue
        # numpy on host tensors: its bool reductions cost ~1/7 of torch's here (measured).
        is_eot = rows.numpy() == EOT_ID if rows.device.type == "cpu" else rows == EOT_ID
        if not bool(is_eot.any(1).all()):
            return context  # a row without EOT pools at its last position: keep everything
        # The batch's last EOT = the last column where any row has one.
        last = max(last, int(is_eot.any(0).nonzero()[0].max()) + 1)
    return min(context, -(-max(last, 1) // multiple) * multiple)


def _tensor(v) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.as_tensor(v)


def pack_regions(
    boxes: torch.Tensor,
    box_counts: torch.Tensor,
    region_tokens: torch.Tensor,
    hardneg_tokens: torch.Tensor,
    hardneg_valid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded per-image boxes (B, M, ...) -> (rois (R, 5), region tokens (R, L), hard rows (H,),
    hard-negative tokens (H, 1+K, L)), the valid boxes image by image in slot order."""
    b, m = boxes.shape[:2]
    valid = torch.arange(m)[None, :] < box_counts[:, None]  # (B, M)
    image_index = valid.nonzero()[:, 0]  # (R,) row-major: image by image, slot order
    rois = torch.cat([image_index[:, None].to(torch.float32), boxes[valid].float()], dim=1)
    hard = hardneg_valid.bool() & valid  # (B, M)
    hard_rows = hard[valid].nonzero()[:, 0]  # (H,) rows of the valid-box table
    return rois, region_tokens[valid], hard_rows, hardneg_tokens[hard]


def batch_from_arrays(
    images: torch.Tensor,
    arrays: dict,
    keys: list[str],
    short_context: int | None = None,
    long_context: int | None = None,
    length_multiple: int = TRIM_MULTIPLE,
) -> Batch:
    """A Batch from SampleSource-style padded arrays (numpy or torch): packs, trims, casts.

    `short_context`/`long_context` cap the trimmed lengths (default: the arrays' widths);
    trimmed lengths are multiples of `length_multiple` below the cap.
    """
    missing = [name for name in OUTPUT_NAMES[1:] if name not in arrays]  # all but 'jpeg'
    if missing:
        raise KeyError(f"batch arrays lack the schema outputs {missing}")
    a = {name: _tensor(arrays[name]) for name in arrays if name not in ("jpeg", "epoch")}
    counts = a["box_counts"].to(torch.int64)
    rois, region, hard_rows, hard_tokens = pack_regions(
        a["boxes"], counts, a["region_tokens"], a["hardneg_tokens"], a["hardneg_valid"]
    )
    long = a["long_tokens"]
    short = a["short_tokens"]
    long_len = trimmed_length([long], long_context or long.shape[-1], length_multiple)
    # Short captions, region phrases and hard-negative phrases share one text-tower call.
    short_len = trimmed_length(
        [short, region, hard_tokens], short_context or short.shape[-1], length_multiple
    )
    return Batch(
        images=images,
        long_tokens=long[:, :long_len].to(torch.int64).contiguous(),
        short_tokens=short[:, :short_len].to(torch.int64).contiguous(),
        box_counts=counts,
        region_rois=rois,
        region_tokens=region[:, :short_len].to(torch.int64).contiguous(),
        hard_rows=hard_rows.to(torch.int64),
        hardneg_tokens=hard_tokens[..., :short_len].to(torch.int64).contiguous(),
        sample_ids=a["sample_ids"].to(torch.int64).cpu(),
        keys=keys,
        epoch=int(arrays["epoch"]),
    )
