"""FG-CLIP 2 (SigLIP 2 NaFlex towers) in the benchmarks: images prepared one by one at their own
patch budget as upstream's eval scripts do (each image alone through Fgclip2ImageProcessor), a
batch padded to its longest image, texts through the SigLIP 2 tokenizer and the task's head.

The same interface as engine.ModelEncoder (prepare / images / regions / tokenize / texts), so
every task runs unchanged on either family.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

from fgclip_mega.data.naflex import PATCH_BUDGETS, grid_for_budget, patchify

NAFLEX_MEAN = NAFLEX_STD = 0.5  # SigLIP 2's image normalisation


def image_budget(height: int, width: int, patch_size: int, protocol) -> int:
    """The patch budget of one image: protocol.max_num_patches when 'fixed', else the smallest
    allowed budget holding its native (W // p) * (H // p) patches, at most max_num_patches
    (upstream `_determine_max_value`; an image under one patch gets the smallest budget)."""
    cap = protocol.max_num_patches
    if protocol.patch_budget == "fixed":
        return cap
    native = (height // patch_size) * (width // patch_size)
    for budget in PATCH_BUDGETS:
        if native <= budget:
            return min(budget, cap)
    return cap


def naflex_item(img, patch_size: int, protocol) -> tuple[torch.Tensor, tuple[int, int]]:
    """PIL RGB image -> ((gh*gw, p*p*3) normalised patches, (gh, gw)): resized with its aspect
    kept to the largest grid within its budget, bilinear antialiased on the uint8 image (HF
    Siglip2ImageProcessor's torchvision path, as fgclip_mega.data.naflex.pack_images)."""
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)
    h, w = x.shape[1:]
    budget = image_budget(h, w, patch_size, protocol)
    gh, gw = grid_for_budget(h, w, patch_size, budget)
    size = [gh * patch_size, gw * patch_size]
    x = tvF.resize(x, size, InterpolationMode.BILINEAR, antialias=True)
    x = (x.float() / 255.0 - NAFLEX_MEAN) / NAFLEX_STD
    return patchify(x, patch_size), (gh, gw)


def pad_items(
    items: Sequence[tuple[torch.Tensor, tuple[int, int]]],
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Prepared images -> pixels (B, N, p*p*3), valid (B, N) bool, grids; N = the longest image
    (padded patches are masked as attention keys, so the length does not change the result
    beyond float rounding, and a batch is the same at any DP size)."""
    n = max(p.shape[0] for p, _ in items)
    pixels = torch.zeros(len(items), n, items[0][0].shape[1])
    valid = torch.zeros(len(items), n, dtype=torch.bool)
    for i, (p, _) in enumerate(items):
        pixels[i, : p.shape[0]] = p
        valid[i, : p.shape[0]] = True
    return pixels, valid, [g for _, g in items]


class NaFlexEncoder:
    """FG-CLIP 2's benchmark calls under the run's autocast: fp32 CPU embeddings, not
    normalised. Texts take protocol.text_head (short / long / box) at its full length."""

    family = "fgclip2"

    def __init__(self, model, tokenizer, runtime=None, protocol=None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.runtime = runtime
        self.protocol = protocol
        self.device = next(model.parameters()).device
        self.patch_size = model.cfg.vision.patch_size
        self.short_context = model.cfg.text.short_context
        self.long_context = model.cfg.text.long_context

    def _ctx(self):
        return self.runtime.autocast() if self.runtime is not None else contextlib.nullcontext()

    def prepare(self, img):
        return naflex_item(img, self.patch_size, self.protocol)

    def _batch(self, items):
        pixels, valid, grids = pad_items(items)
        return pixels.to(self.device), valid.to(self.device), grids

    @torch.no_grad()
    def images(self, items) -> torch.Tensor:
        """B prepared images -> (B, D) MAP-head embeddings."""
        with self._ctx():
            return self.model.encode_image(*self._batch(items)).float().cpu()

    @torch.no_grad()
    def regions(self, items, rois: torch.Tensor) -> torch.Tensor:
        """B prepared images, rois (R, 5) [image, x1, y1, x2, y2] normalised to each image ->
        (R, D): RoIAlign (1 x 1, aligned, adaptive sampling) of the dense feature head's map on
        each image's own patch grid, upstream's get_image_box_roi_features."""
        with self._ctx():
            _, dense = self.model.encode_image(*self._batch(items), with_dense=True)
            return self.model.region_embeddings(dense, rois.to(self.device)).float().cpu()

    def tokenize(self, texts: Sequence[str], length: int) -> torch.Tensor:
        """(T, length) SigLIP 2 tokens of the lowercased texts, padded to `length`."""
        return torch.from_numpy(self.tokenizer(list(texts), length)).long()

    @torch.no_grad()
    def texts(self, tokens: torch.Tensor) -> torch.Tensor:
        kind = self.protocol.text_head
        with self._ctx():
            return self.model.encode_text(tokens.to(self.device), kind).float().cpu()
