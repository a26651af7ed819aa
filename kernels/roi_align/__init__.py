# Batched RoIAlign for FG-CLIP: C++/CUDA operator torch.ops.fgclip.roi_align (built by
# `bash run/build_ext.sh`), autograd wrapper, and a pure-PyTorch reference fallback.
from . import checks
from ._lib import LibStatus, lib_dir
from ._lib import load as load_library
from .ops import pool_boxes, pool_rois, roi_align, select_backend
from .reference import boxes_to_rois, roi_align_reference

__all__ = [
    "LibStatus",
    "boxes_to_rois",
    "lib_dir",
    "load_library",
    "checks",
    "pool_boxes",
    "pool_rois",
    "roi_align",
    "roi_align_reference",
    "select_backend",
]
