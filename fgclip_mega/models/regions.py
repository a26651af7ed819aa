"""Region pooling of the dense feature map: the one place the model calls RoIAlign.

It uses `kernels.roi_align.pool_rois` (FG-CLIP's settings: normalised boxes scaled to the grid,
1x1 output, adaptive sampling, aligned=True) on rois the loader packed on the host, so pooling
reads nothing back from the device. kernels.roi_align dispatches to the compiled CPU/CUDA op.
"""

from __future__ import annotations

import torch


def pool_regions(dense: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
    """dense (B, C, h, w); rois (R, 5) [image index, x1, y1, x2, y2] normalised -> (R, C) fp32."""
    from kernels.roi_align import pool_rois

    if rois.dim() != 2 or rois.shape[-1] != 5:
        raise ValueError(f"rois must be (R, 5) [image, x1, y1, x2, y2], got {tuple(rois.shape)}")
    return pool_rois(dense.float(), rois.float()).flatten(1)  # (R, C, 1, 1) -> (R, C)
