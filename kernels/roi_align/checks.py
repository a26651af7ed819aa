# Argument checks shared by the compiled op (ops.roi_align) and the pure-PyTorch reference
# (reference.roi_align_reference): both call check_roi_align_args first, so a bad argument gets
# the same exception and message whichever path runs, before any kernel can touch memory.
#
# Values inside rois (finite coordinates, batch index, adaptive sample count) are checked only
# when rois live on the CPU: reading a device tensor's values would need a device->host sync.
# The training path builds rois on the host (ops.pool_rois), so they are always checked there;
# rois already on a GPU (or traced by torch.compile) get the kernels' own guard: the CPU op raises
# naming the row, the CUDA op pools a non-finite or out-of-range box to zero.
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

INT32_MAX = 2**31 - 1  # the kernels index output bins, rows, columns and samples with int32
INT64_MAX = 2**63 - 1
FEATURE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_output_size(
    output_size: int | Sequence[int], what: str = "output_size"
) -> tuple[int, int]:
    if _is_int(output_size):
        size = (int(output_size), int(output_size))
    elif (
        isinstance(output_size, Sequence)
        and len(output_size) == 2
        and all(_is_int(s) for s in output_size)
    ):
        size = (int(output_size[0]), int(output_size[1]))
    else:
        raise TypeError(f"roi_align: {what} must be an int or a pair of ints, got {output_size!r}")
    if not all(1 <= s <= INT32_MAX for s in size):
        raise ValueError(
            f"roi_align: {what} must be in [1, 2^31 - 1] on each axis, got {output_size!r}"
        )
    return size


def _check_features(input) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"roi_align: input must be a Tensor, got {type(input).__name__}")
    if input.dim() != 4:
        raise ValueError(f"roi_align: input must be (N, C, H, W), got shape {tuple(input.shape)}")
    if input.dtype not in FEATURE_DTYPES:
        raise ValueError(f"roi_align: input must be fp16, bf16, fp32 or fp64, got {input.dtype}")
    if max(input.shape[2:]) > INT32_MAX:
        raise ValueError(f"roi_align: input H and W must be < 2^31, got {tuple(input.shape)}")


def check_rois_layout(rois, what: str = "rois") -> None:
    if not isinstance(rois, Tensor):
        raise TypeError(f"roi_align: {what} must be a Tensor, got {type(rois).__name__}")
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"roi_align: {what} must be (K, 5) [batch_index, x1, y1, x2, y2], "
            f"got shape {tuple(rois.shape)}"
        )
    if rois.dtype not in FEATURE_DTYPES:
        raise ValueError(f"roi_align: {what} must be a real floating tensor, got {rois.dtype}")


def check_scalar_args(spatial_scale: float, sampling_ratio: int, aligned: bool) -> None:
    if not isinstance(spatial_scale, numbers.Real) or isinstance(spatial_scale, bool):
        raise TypeError(f"roi_align: spatial_scale must be a number, got {spatial_scale!r}")
    if not (math.isfinite(spatial_scale) and spatial_scale > 0):
        raise ValueError(f"roi_align: spatial_scale must be finite and > 0, got {spatial_scale}")
    if not _is_int(sampling_ratio):
        raise TypeError(f"roi_align: sampling_ratio must be an int, got {sampling_ratio!r}")
    if not -INT32_MAX <= sampling_ratio <= INT32_MAX:
        raise ValueError(
            f"roi_align: sampling_ratio must fit in int32 (<= 0 means adaptive), "
            f"got {sampling_ratio}"
        )
    if not isinstance(aligned, bool):
        raise TypeError(f"roi_align: aligned must be a bool, got {aligned!r}")


def check_roi_align_args(
    input: Tensor,  # (N, C, H, W)
    rois: Tensor,  # (K, 5)
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[int, int]:  # (PH, PW)
    ph, pw = check_output_size(output_size)
    _check_features(input)
    check_rois_layout(rois)
    if rois.device != input.device:
        raise ValueError(
            f"roi_align: rois are on {rois.device} but input is on {input.device}; "
            "move them to the same device"
        )
    check_scalar_args(spatial_scale, sampling_ratio, aligned)
    n, c = input.shape[:2]
    k = rois.shape[0]
    if k * c * ph * pw * input.element_size() > INT64_MAX:
        raise ValueError(
            f"roi_align: output_size {(ph, pw)} with {k} rois and {c} channels overflows int64"
        )
    # Under torch.compile, value checks would break the graph: the kernels' guard applies there.
    if rois.device.type == "cpu" and not torch.compiler.is_compiling():
        check_roi_values(rois, n, (ph, pw), float(spatial_scale), int(sampling_ratio), aligned)
    return ph, pw


def _first_bad(bad: Tensor) -> int | None:  # bad: (K,) bool on the CPU
    idx = bad.nonzero()
    return int(idx[0, 0]) if idx.numel() else None


def check_roi_values(
    rois: Tensor,  # (K, 5) on the CPU
    batch_size: int,
    output_size: tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> None:
    if rois.numel() == 0:
        return
    r = rois.detach().double()  # fp64: exact for every fp16/bf16/fp32 value
    row = _first_bad(~torch.isfinite(r).all(dim=1))
    if row is not None:
        raise ValueError(f"roi_align: rois row {row} is not finite: {rois[row].tolist()}")
    # The kernels truncate the batch column toward zero (as torchvision): valid iff -1 < b < N.
    b = r[:, 0]
    row = _first_bad((b <= -1) | (b >= batch_size))
    if row is not None:
        raise ValueError(
            f"roi_align: rois row {row} has batch index {rois[row, 0].item()} outside "
            f"[0, {batch_size})"
        )
    if sampling_ratio > 0:
        return
    # Adaptive sampling takes ceil(bin size) samples per axis; the kernels count them in int32.
    offset = 0.5 if aligned else 0.0
    for lo, hi, pooled, axis in ((2, 4, output_size[0], "y"), (1, 3, output_size[1], "x")):
        size = (r[:, hi] * spatial_scale - offset) - (r[:, lo] * spatial_scale - offset)
        if not aligned:
            size = size.clamp_min(1.0)
        grid = torch.ceil(size / pooled)  # (K,)
        row = _first_bad(grid > INT32_MAX)
        if row is not None:
            raise ValueError(
                f"roi_align: rois row {row} spans {float(size[row]):.4g} pixels along {axis}: "
                f"adaptive sampling would take more than 2^31 - 1 samples per bin on that axis; "
                "pass sampling_ratio > 0 or fix the box"
            )
