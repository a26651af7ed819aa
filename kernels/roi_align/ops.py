# Python entry points of the fgclip RoIAlign: backend dispatch, autograd wrapper, FG-CLIP helper.
#
# roi_align() is a drop-in for torchvision.ops.roi_align (same arguments and defaults) that runs
# all images of a step in one call. Backward is deterministic by default (see roi_align_cpu.cpp /
# roi_align_cuda.cu for the algorithm and its cost); deterministic=False selects the atomic
# scatter backward on CUDA (the CPU backward is always deterministic).
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from . import _lib
from .reference import _pair, boxes_to_rois, roi_align_reference

Backend = Literal["auto", "cuda", "cpu", "reference"]
_warned_fallback = False


def select_backend(device: torch.device | str, backend: Backend = "auto") -> str:
    """Returns "cuda", "cpu" or "reference" for tensors on `device`.

    "auto" picks the compiled kernel for the device, and falls back to the pure-PyTorch reference
    (with a one-time warning) only when the compiled library is missing. Asking for "cpu" or
    "cuda" explicitly raises if that kernel is unavailable or does not match the device.
    """
    global _warned_fallback
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown RoIAlign backend {backend!r}")
    want = device.type if backend == "auto" else backend
    if want != device.type:
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors")
    status = _lib.load()
    if (want == "cpu" and status.cpu) or (want == "cuda" and status.cuda):
        return want
    why = "; ".join(status.errors) or f"no {want} kernel registered"
    if backend != "auto":
        raise RuntimeError(f"fgclip RoIAlign {want} kernel unavailable ({why}): {_lib.BUILD_HINT}")
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"fgclip RoIAlign: compiled {want} kernel unavailable ({why}); using the slow "
            f"pure-PyTorch reference instead. To fix, {_lib.BUILD_HINT}.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "reference"


class _RoIAlignFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, rois, scale, ph, pw, sampling_ratio, aligned, deterministic):
        ctx.save_for_backward(rois)
        # The gradient comes back in the memory format of the features (channels-last for a
        # permuted token tensor), so it flows back through the permute/view without a copy.
        channels_last = not input.is_contiguous() and input.is_contiguous(
            memory_format=torch.channels_last
        )
        ctx.args = (scale, ph, pw, sampling_ratio, aligned, deterministic, channels_last)
        ctx.input_shape = tuple(input.shape)
        return torch.ops.fgclip.roi_align(input, rois, scale, ph, pw, sampling_ratio, aligned)

    @staticmethod
    def backward(ctx, grad):  # grad: (K, C, PH, PW)
        (rois,) = ctx.saved_tensors
        gin = None
        if ctx.needs_input_grad[0]:
            gin = _RoIAlignBackwardFn.apply(grad, rois, ctx.input_shape, *ctx.args)
        return gin, None, None, None, None, None, None, None


class _RoIAlignBackwardFn(torch.autograd.Function):
    # The backward is linear in grad and its adjoint is the forward op, which gives double
    # backward for free.
    @staticmethod
    def forward(ctx, grad, rois, input_shape, scale, ph, pw, sampling_ratio, aligned, det, cl):
        ctx.save_for_backward(rois)
        ctx.args = (scale, ph, pw, sampling_ratio, aligned)
        n, c, h, w = input_shape
        return torch.ops.fgclip.roi_align_backward(
            grad, rois, scale, ph, pw, n, c, h, w, sampling_ratio, aligned, det, cl
        )

    @staticmethod
    def backward(ctx, ggin):  # ggin: (N, C, H, W)
        (rois,) = ctx.saved_tensors
        gg = None
        if ctx.needs_input_grad[0]:
            gg = torch.ops.fgclip.roi_align(ggin, rois, *ctx.args)
        return gg, None, None, None, None, None, None, None, None, None


def roi_align(
    input: Tensor,  # (N, C, H, W) fp32 / fp16 / bf16 / fp64
    rois: Tensor | Sequence[Tensor],  # (K, 5) [batch_index, x1, y1, x2, y2] or per-image (M, 4)
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    deterministic: bool = True,
    backend: Backend = "auto",
) -> Tensor:  # (K, C, PH, PW), dtype of input
    ph, pw = _pair(output_size)
    if not isinstance(rois, Tensor):
        rois = boxes_to_rois(list(rois))
    rois = rois.to(input.device)
    chosen = select_backend(input.device, backend)
    if chosen == "reference":
        return roi_align_reference(input, rois, (ph, pw), spatial_scale, sampling_ratio, aligned)
    return _RoIAlignFn.apply(
        input, rois, float(spatial_scale), ph, pw, int(sampling_ratio), bool(aligned), deterministic
    )


def pool_boxes(
    feature_map: Tensor,  # (B, D, h, w) dense patch features
    boxes: Tensor | Sequence[Tensor],  # (B, M, 4) padded or per-image (M_b, 4), normalised xyxy
    counts: Tensor | Sequence[int] | None = None,  # (B,) valid boxes per padded image
    *,
    deterministic: bool = True,
    backend: Backend = "auto",
) -> Tensor:  # (K, D), boxes in batch-major order
    # FG-CLIP's region pooling: normalised boxes scaled to the grid, 1x1 adaptive RoIAlign with
    # aligned=True, all images in one call.
    h, w = feature_map.shape[-2:]
    rois = boxes_to_rois(boxes, counts, grid_size=(h, w))
    out = roi_align(
        feature_map, rois, 1, 1.0, -1, True, deterministic=deterministic, backend=backend
    )
    return out[:, :, 0, 0]
