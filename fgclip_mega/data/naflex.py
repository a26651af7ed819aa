"""NaFlex image geometry for FG-CLIP 2 (SigLIP 2 NaFlex towers): variable resolution under a
patch budget.

Each image keeps its aspect ratio and is resized so that its patch grid (gh, gw) is the largest
one with gh * gw <= budget (HF `Siglip2ImageProcessor`'s search, reproduced exactly); its patches
are flattened in (row, col) order, each patch as (py, px, channel), and padded to the budget with
a validity mask. A batch shares one budget: upstream's collator (`train_fgclip2.py`,
`determine_max_value`) takes the smallest allowed budget that holds the batch's largest native
grid (w // 16) * (h // 16), capped at the run's maximum. Everything here is host-side geometry
or torch ops on the images' device (CPU, or CUDA after nvJPEG decoding): no device value is
read back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

PATCH_BUDGETS = (128, 256, 576, 784, 1024)
"""The patch budgets FG-CLIP 2 trains with (upstream asserts max_num_patches in this set, plus
4096 for evaluation at high resolution)."""


class NaFlexError(ValueError):
    """An image or a budget NaFlex cannot handle; the message names it."""


def check_budget(budget: int, allowed: Sequence[int] = PATCH_BUDGETS) -> int:
    if budget not in allowed:
        raise NaFlexError(f"patch budget {budget} is not one of the allowed {sorted(allowed)}")
    return budget


def batch_budget(native_patches: Sequence[int], max_budget: int = 1024) -> int:
    """The budget of a batch whose images have these native patch counts (w//p * h//p): the
    smallest allowed budget >= the largest count, at most `max_budget` (upstream's rule)."""
    check_budget(max_budget)
    largest = max(native_patches)
    for budget in PATCH_BUDGETS:
        if budget >= min(largest, max_budget):
            return min(budget, max_budget)
    return max_budget


def native_patches(height: int, width: int, patch_size: int) -> int:
    """Patches an image has at its own resolution; an image smaller than one patch is an error
    (upstream silently resized such images to 512 x 512)."""
    if height < patch_size or width < patch_size:
        raise NaFlexError(
            f"image of {width}x{height} px is smaller than one {patch_size}x{patch_size} patch"
        )
    return (height // patch_size) * (width // patch_size)


def grid_for_budget(
    height: int, width: int, patch_size: int, budget: int, eps: float = 1e-5
) -> tuple[int, int]:
    """(gh, gw) patch grid of an image resized for `budget` patches, aspect ratio kept: HF's
    bisection on the scale (`get_image_size_for_max_num_patches`), so grids match it exactly."""

    def scaled(scale: float, size: int) -> int:
        return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (scaled(mid, height) / patch_size) * (scaled(mid, width) / patch_size) <= budget:
            lo = mid
        else:
            hi = mid
    return scaled(lo, height) // patch_size, scaled(lo, width) // patch_size


def patchify(image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(C, gh*p, gw*p) -> (gh*gw, p*p*C): patches row-major, each flattened as (py, px, C)."""
    c, h, w = image.shape
    gh, gw = h // patch_size, w // patch_size
    x = image.reshape(c, gh, patch_size, gw, patch_size).permute(1, 3, 2, 4, 0)
    return x.reshape(gh * gw, patch_size * patch_size * c)


def pack_images(
    images: Sequence[torch.Tensor],
    patch_size: int,
    budget: int,
    *,
    mean: float = 0.5,
    std: float = 0.5,
    antialias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 images (C, H, W) of any sizes -> pixel_values (B, budget, p*p*C) fp32 normalised,
    valid mask (B, budget) bool, both on the images' device, and grids (B, 2) int64 (gh, gw) on
    the CPU (host geometry: nothing is read back from a device).

    Resize is bilinear with antialiasing on the uint8 image, as HF's torchvision backend does;
    pixels are then rescaled to [0, 1] and normalised with `mean`/`std`. On CPU tensors this is
    HF's CPU result bit for bit; on CUDA tensors torchvision resizes in float (its uint8 kernel
    is CPU-only), as HF's processor does on CUDA."""
    device = images[0].device if len(images) else torch.device("cpu")
    pixels = torch.zeros(len(images), budget, patch_size * patch_size * 3, device=device)
    valid = torch.zeros(len(images), budget, dtype=torch.bool, device=device)
    grids = torch.zeros(len(images), 2, dtype=torch.int64)
    for i, image in enumerate(images):
        if image.dim() != 3 or image.shape[0] != 3:
            raise NaFlexError(f"image {i}: expected (3, H, W), got {tuple(image.shape)}")
        if image.device != device:
            raise NaFlexError(f"image {i} is on {image.device}, image 0 on {device}")
        h, w = image.shape[1:]
        native_patches(h, w, patch_size)
        gh, gw = grid_for_budget(h, w, patch_size, budget)
        # torchvision's uint8 kernel (what HF's processor runs), not a float resize: the two
        # differ by one grey level on ~1% of pixels.
        size = [gh * patch_size, gw * patch_size]
        x = tvF.resize(image, size, InterpolationMode.BILINEAR, antialias=antialias)
        x = (x.float() / 255.0 - mean) / std
        n = gh * gw
        pixels[i, :n] = patchify(x, patch_size)
        valid[i, :n] = True
        grids[i] = torch.tensor([gh, gw])
    return pixels, valid, grids


@dataclass
class NaFlexBatch:
    """A FG-CLIP 2 micro-batch: images packed to one patch budget, texts padded to full length
    (SigLIP pools the last position), boxes packed as in `Batch`."""

    pixels: torch.Tensor
    """(B, N, p*p*3) normalised patches, N = the batch's patch budget."""
    valid: torch.Tensor
    """(B, N) bool: real patches (image i's first gh*gw)."""
    grids: list[tuple[int, int]]
    """Each image's patch grid (gh, gw), host ints (the model reads no device value)."""
    long_tokens: torch.Tensor
    """(B, 196) int64 long captions."""
    short_tokens: torch.Tensor
    """(B, 64) int64 'a photo of ' + short caption (English), lowercased."""
    region_rois: torch.Tensor
    """(R, 5) float32 [image index, x1, y1, x2, y2] normalised to each image."""
    region_tokens: torch.Tensor
    """(R, 64) int64 phrase of each box."""
    hard_rows: torch.Tensor
    """(H,) int64 rows of region_rois whose box has hard negatives."""
    hardneg_tokens: torch.Tensor
    """(H, 1+K, 64) int64: the box's phrase, then its K negatives."""
    hardneg_valid: torch.Tensor | None = None
    """(H, K) bool real negatives (None = all)."""

    def to(self, device: torch.device | str, non_blocking: bool = True) -> NaFlexBatch:
        """The tensors on `device` (pinned first for an overlapped copy to CUDA); host-side
        fields (grids, sample ids, keys) stay as they are. Keeps the subclass."""
        device = torch.device(device)
        pin = non_blocking and device.type == "cuda"
        moved = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.startswith("sample_") or not isinstance(v, torch.Tensor):
                continue
            if v.device != device:
                if pin and v.device.type == "cpu" and not v.is_pinned():
                    v = v.pin_memory()
                moved[f.name] = v.to(device, non_blocking=non_blocking)
        return dataclasses.replace(self, **moved) if moved else self

    def __len__(self) -> int:
        return self.pixels.shape[0]
