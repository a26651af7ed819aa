"""Region pooling of the dense feature map: the one place the model calls RoIAlign.

It uses `kernels.roi_align.pool_boxes` (FG-CLIP's settings: boxes scaled to the grid, 1x1
output, adaptive sampling, aligned=True), which runs torch.ops.fgclip.roi_align when the
extension is built (`bash run/build_ext.sh`) and its pure-PyTorch reference otherwise.
"""

from __future__ import annotations

import torch


def pool_regions(dense: torch.Tensor, boxes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """dense (B, C, h, w); boxes (B, K, 4) normalised xyxy, padded; counts (B,) valid boxes
    per image -> (sum counts, C) fp32, ordered image by image."""
    from kernels.roi_align import pool_boxes

    b, k = boxes.shape[:2]
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or b != dense.shape[0]:
        raise ValueError(f"boxes must be (B={dense.shape[0]}, K, 4), got {tuple(boxes.shape)}")
    if counts.shape != (b,) or (b and not 0 <= int(counts.min()) <= int(counts.max()) <= k):
        raise ValueError(f"counts must be (B,)=({b},) with values in [0, K={k}], got {counts}")
    return pool_boxes(dense.float(), boxes.float(), counts)
