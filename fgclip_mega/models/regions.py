"""Region pooling of the dense feature map: one function, so the RoIAlign kernel can be swapped.

`kernels/roi_align/` (torch.ops.fgclip.roi_align) did not exist when this was written; this uses
torchvision.ops.roi_align with FG-CLIP's settings (1x1 output, adaptive sampling, aligned).
"""

from __future__ import annotations

import torch


def roi_align_1x1(features: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """features (B, C, h, w); rois (K, 5) = (batch index, x1, y1, x2, y2) in grid cells ->
    (K, C) fp32, the RoIAlign average over each box (sampling_ratio=-1, aligned=True)."""
    from torchvision.ops import roi_align

    out = roi_align(
        features.float(),
        rois.float(),
        output_size=(1, 1),
        spatial_scale=1.0,
        sampling_ratio=-1,
        aligned=True,
    )  # (K, C, 1, 1)
    return out[:, :, 0, 0]


def boxes_to_rois(boxes: torch.Tensor, counts: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """boxes (B, K, 4) normalised xyxy in [0, 1], padded; counts (B,) valid boxes per image ->
    (sum counts, 5) RoIs in grid cells, ordered image by image."""
    b, k = boxes.shape[:2]
    if counts.shape != (b,) or (b and int(counts.max()) > k) or (b and int(counts.min()) < 0):
        raise ValueError(f"counts {tuple(counts.shape)} must be (B,)={b} with values in [0, K={k}]")
    valid = torch.arange(k, device=boxes.device)[None, :] < counts[:, None].to(boxes.device)
    scale = boxes.new_tensor([w, h, w, h])
    index = torch.arange(b, device=boxes.device, dtype=boxes.dtype)[:, None].expand(b, k)
    return torch.cat([index[valid][:, None], boxes[valid] * scale], dim=1)
