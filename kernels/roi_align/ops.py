# Python entry points of the fgclip RoIAlign: backend dispatch, autograd wrapper, FG-CLIP helpers.
#
# roi_align() is a drop-in for torchvision.ops.roi_align (same arguments and defaults) that runs
# all images of a step in one call. Backward is deterministic by default (see roi_align_cpu.cpp /
# roi_align_cuda.cu for the algorithm and its cost); deterministic=False selects the atomic
# scatter backward on CUDA (the CPU backward is always deterministic).
#
# pool_rois() is the training path: flat (R, 5) rois in normalised coordinates built on the host,
# value-checked there, copied to the features' device without any device->host sync.
# pool_boxes() is the older padded (B, M, 4) + counts form (boolean masking: syncs on a GPU).
from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from . import _lib
from .checks import (
    check_output_size,
    check_roi_align_args,
    check_roi_values,
    check_rois_layout,
    check_scalar_args,
)
from .reference import as_rois, boxes_to_rois, reference_forward

Backend = Literal["auto", "cuda", "cpu", "reference"]
_warned_fallback = False


def select_backend(device: torch.device | str, backend: Backend = "auto") -> str:
    """Returns "cuda", "cpu", "meta" or "reference" for tensors on `device`.

    The one place that decides between the compiled kernels and the pure-PyTorch reference.
    "auto" picks the compiled kernel for the device. On the CPU it falls back to the reference
    (with a one-time warning) when the compiled library is missing; on CUDA it raises instead:
    a GPU run on the reference would be silently orders of magnitude slower. Asking for "cpu"
    or "cuda" explicitly raises if that kernel is unavailable or does not match the device;
    "reference" forces the reference. Meta tensors take the compiled op's shape-only kernel.
    """
    global _warned_fallback
    device = torch.device(device)
    if backend == "reference":
        return "reference"
    if backend not in ("auto", "cpu", "cuda"):
        raise ValueError(f"unknown RoIAlign backend {backend!r}")
    status = _lib.load()
    if device.type == "meta" and backend == "auto" and status.cpu:
        return "meta"
    want = device.type if backend == "auto" else backend
    if want != device.type:
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors")
    if (want == "cpu" and status.cpu) or (want == "cuda" and status.cuda):
        return want
    why = "; ".join(status.errors) or f"no {want} kernel registered"
    if backend != "auto" or want == "cuda":
        raise RuntimeError(
            f"fgclip RoIAlign {want} kernel unavailable ({why}): {_lib.BUILD_HINT}"
            + (
                " with the CUDA toolkit; not falling back to the slow pure-PyTorch reference "
                "on a GPU (pass backend='reference' to force it)"
                if want == "cuda"
                else ""
            )
        )
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
    rois = as_rois(rois)
    ph, pw = check_roi_align_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    chosen = select_backend(input.device, backend)
    if chosen == "reference":
        return reference_forward(input, rois, ph, pw, float(spatial_scale), sampling_ratio, aligned)
    return _RoIAlignFn.apply(
        input, rois, float(spatial_scale), ph, pw, int(sampling_ratio), aligned, deterministic
    )


def _as_feature_map(features: Tensor, grid_size: int | Sequence[int] | None) -> Tensor:
    # (B, C, h, w) as is; (B, h*w, C) tokens viewed as (B, C, h, w) without a copy
    # (channels-last memory, which the kernels read in place).
    if features.dim() == 4:
        return features
    if features.dim() != 3:
        raise ValueError(
            f"pool_rois: features must be (B, C, h, w) or tokens (B, h*w, C), "
            f"got shape {tuple(features.shape)}"
        )
    b, tokens, c = features.shape
    if grid_size is None:
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ValueError(f"pool_rois: {tokens} tokens are not a square grid; pass grid_size")
        grid_size = side
    h, w = check_output_size(grid_size, "grid_size")
    if h * w != tokens:
        raise ValueError(f"pool_rois: grid_size {(h, w)} does not hold {tokens} tokens")
    return features.transpose(1, 2).reshape(b, c, h, w)


def pool_rois(
    features: Tensor,  # (B, C, h, w), or (B, h*w, C) tokens
    rois: Tensor,  # (R, 5) [image_index, x1, y1, x2, y2], xyxy normalised to [0, 1]; host
    output_size: int | Sequence[int] = 1,
    *,
    grid_size: int | Sequence[int] | None = None,  # (h, w) of token features (default: square)
    sampling_ratio: int = -1,
    aligned: bool = True,
    deterministic: bool = True,
    backend: Backend = "auto",
) -> Tensor:  # (R, C, PH, PW), dtype of features
    # Coordinates are scaled by the grid (x by w, y by h) and pooled with aligned=True (the
    # half-pixel convention) and adaptive sampling, FG-CLIP's settings. Host (CPU) rois are
    # value-checked on the host and copied to the features' device asynchronously, so no
    # device->host sync happens (pin them for a truly asynchronous copy).
    if not isinstance(features, Tensor):
        raise TypeError(f"pool_rois: features must be a Tensor, got {type(features).__name__}")
    fmap = _as_feature_map(features, grid_size)
    check_rois_layout(rois)
    ph, pw = check_output_size(output_size)
    check_scalar_args(1.0, sampling_ratio, aligned)
    h, w = fmap.shape[-2:]
    dtype = torch.float64 if rois.dtype == torch.float64 else torch.float32
    r = rois.to(dtype)  # (R, 5)
    # Scaled by Python numbers: a (1, w, h, w, h) tensor made on the rois' device would be a
    # host->device copy, a stream sync on CUDA, on every call.
    scaled = torch.stack([r[:, 0], r[:, 1] * w, r[:, 2] * h, r[:, 3] * w, r[:, 4] * h], dim=1)
    if scaled.device != fmap.device and scaled.device.type == "cpu":
        check_roi_values(scaled, fmap.shape[0], (ph, pw), 1.0, sampling_ratio, aligned)
        if fmap.device.type == "cuda":
            scaled = scaled.pin_memory()  # so the copy below is truly asynchronous
        scaled = scaled.to(fmap.device, non_blocking=True)
    return roi_align(
        fmap,
        scaled,
        (ph, pw),
        1.0,
        sampling_ratio,
        aligned,
        deterministic=deterministic,
        backend=backend,
    )


def pool_boxes(
    feature_map: Tensor,  # (B, D, h, w) dense patch features
    boxes: Tensor | Sequence[Tensor],  # (B, M, 4) padded or per-image (M_b, 4), normalised xyxy
    counts: Tensor | Sequence[int] | None = None,  # (B,) valid boxes per padded image
    *,
    deterministic: bool = True,
    backend: Backend = "auto",
) -> Tensor:  # (K, D), boxes in batch-major order
    # FG-CLIP's region pooling from padded boxes; the masking syncs with device tensors, so the
    # training path should build flat rois on the host (boxes_to_rois) and call pool_rois.
    rois = boxes_to_rois(boxes, counts)  # (K, 5) normalised
    out = pool_rois(
        feature_map, rois, 1, deterministic=deterministic, backend=backend
    )  # (K, D, 1, 1)
    return out[:, :, 0, 0]
