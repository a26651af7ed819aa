# Pure-PyTorch RoIAlign with torchvision semantics: the fallback when the compiled library
# (`bash run/build_ext.sh`) is missing, and a float64 oracle for the tests. Differentiable by
# autograd with respect to the features (boxes are treated as constants, as in torchvision).
#
# Same separable formulation as the C++/CUDA kernels (see roi_align_common.h): each output bin is
# the outer product of a row profile (PH, H) and a column profile (PW, W), built from the
# bilinear weights of the bin's sample points, applied with two einsums. Memory: it gathers the
# features of every box, (K, C, H, W), so it is meant for correctness, not speed.
#
# Arguments are validated by checks.check_roi_align_args, the same checker the compiled op uses.
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .checks import INT32_MAX, check_output_size, check_roi_align_args

_SAMPLE_CHUNK = 4096  # samples per axis handled at once: bounds memory to (K, P, 4096)


def _axis_profiles(
    lo: Tensor,  # (K,) box start along the axis, input units
    hi: Tensor,  # (K,) box end
    length: int,  # H or W
    pooled: int,  # PH or PW
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor]:  # (K, P, length) profile, (K,) samples per bin (-1: invalid box)
    # Mirrors torchvision's arithmetic order so sample positions match it exactly in fp32.
    offset = 0.5 if aligned else 0.0
    start = lo * spatial_scale - offset  # (K,)
    size = (hi * spatial_scale - offset) - start
    if not aligned:
        size = size.clamp_min(1.0)
    bin_size = size / pooled  # (K,)
    if sampling_ratio > 0:
        grid = torch.full_like(bin_size, sampling_ratio, dtype=torch.int64)
    else:
        # Like the kernels: a sample count that is NaN or beyond int32 marks the box invalid
        # (-1, pools to zero); the checker rejects such rois when it can see their values.
        ceil = torch.ceil(bin_size.double())
        ok = ceil <= INT32_MAX  # False for NaN and +inf
        grid = torch.where(ok, ceil.clamp_min(0), torch.full_like(ceil, -1)).to(torch.int64)
    n_samples = max(int(grid.max()), 0) if grid.numel() else 0
    p = torch.arange(pooled, device=lo.device, dtype=lo.dtype)  # (P,)
    g = grid.clamp_min(1).to(lo.dtype)[:, None, None]
    b = bin_size[:, None, None]
    prof = torch.zeros(lo.shape[0], pooled, length, dtype=lo.dtype, device=lo.device)
    for first in range(0, n_samples, _SAMPLE_CHUNK):
        i = torch.arange(
            first, min(first + _SAMPLE_CHUNK, n_samples), device=lo.device, dtype=lo.dtype
        )  # (G,)
        c = start[:, None, None] + p[None, :, None] * b + (i + 0.5)[None, None, :] * b / g
        live = i[None, None, :] < grid[:, None, None]  # (K, P, G)
        valid = live & (c >= -1.0) & (c <= length)  # sample inside [-1, length]; False for NaN
        c = torch.where(valid, c.clamp_min(0.0), torch.zeros_like(c))
        low = c.to(torch.int64)  # c >= 0: truncation == floor
        edge = low >= length - 1
        low = torch.where(edge, torch.full_like(low, length - 1), low)
        high = torch.where(edge, low, low + 1)
        frac = torch.where(edge, torch.zeros_like(c), c - low.to(c.dtype))
        w_low = torch.where(valid, 1.0 - frac, torch.zeros_like(c))
        w_high = torch.where(valid, frac, torch.zeros_like(c))
        prof.scatter_add_(2, low, w_low).scatter_add_(2, high, w_high)  # (K, P, length)
    return prof, grid


def roi_align_reference(
    input: Tensor,  # (N, C, H, W)
    rois: Tensor | Sequence[Tensor],  # (K, 5) [batch_index, x1, y1, x2, y2] or per-image (M, 4)
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:  # (K, C, PH, PW)
    rois = as_rois(rois)
    ph, pw = check_roi_align_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return reference_forward(input, rois, ph, pw, float(spatial_scale), sampling_ratio, aligned)


def reference_forward(
    input: Tensor,
    rois: Tensor,
    ph: int,
    pw: int,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:  # (K, C, PH, PW); arguments already checked
    n, c, h, w = input.shape
    k = rois.shape[0]
    # fp16/bf16 are computed in fp32 like the compiled kernels; fp64 stays fp64.
    cdt = torch.float64 if input.dtype == torch.float64 else torch.float32
    if k == 0 or h == 0 or w == 0:
        # Zeros still connected to input, so autograd gives it a zero gradient (as the op does).
        return input.flatten()[:0].sum() + input.new_zeros((k, c, ph, pw))
    r = rois.detach().to(device=input.device, dtype=cdt)
    # Batch index truncated toward zero, like torchvision's int cast. Device rois were not
    # value-checked (that needs a sync); this oracle may sync, so it checks them here.
    bad_index = ~((r[:, 0] > -1) & (r[:, 0] < n))
    if bool(bad_index.any()):
        raise ValueError(f"roi_align: rois[:, 0] holds a batch index outside [0, {n})")
    bidx = r[:, 0].to(torch.int64)
    wy, gy = _axis_profiles(r[:, 2], r[:, 4], h, ph, spatial_scale, sampling_ratio, aligned)
    wx, gx = _axis_profiles(r[:, 1], r[:, 3], w, pw, spatial_scale, sampling_ratio, aligned)
    count = (gy * gx).to(cdt)  # int64 product: no overflow for 2^31 x 2^31 samples
    finite = torch.isfinite(r).all(dim=1)
    has = (gy > 0) & (gx > 0) & finite  # non-finite boxes pool to zero, as in the kernels
    norm = torch.where(has, 1.0 / count.clamp_min(1.0), torch.zeros_like(count))  # (K,)
    feats = input.to(cdt)[bidx]  # (K, C, H, W)
    t = torch.einsum("kchw,kqw->kchq", feats, wx)  # (K, C, H, PW)
    out = torch.einsum("kchq,kph->kcpq", t, wy) * norm[:, None, None, None]  # (K, C, PH, PW)
    return out.to(input.dtype)


def as_rois(rois: Tensor | Sequence[Tensor]) -> Tensor:
    # torchvision also takes a list of per-image (M_i, 4) boxes; anything else goes to the checker.
    return boxes_to_rois(rois) if isinstance(rois, (list, tuple)) else rois


def _check_counts(counts: Tensor, sizes: Sequence[int]) -> Tensor:  # (B,) int64
    # sizes[b]: boxes available for image b. Counts on a device are read back (a host sync):
    # callers on the training path pass flat host-built rois to ops.pool_rois instead.
    if counts.dtype.is_floating_point or counts.dtype.is_complex or counts.dtype == torch.bool:
        raise ValueError(f"pool_boxes: counts must be integers, got {counts.dtype}")
    if counts.shape != (len(sizes),):
        raise ValueError(
            f"pool_boxes: counts must be (B,) = ({len(sizes)},), got shape {tuple(counts.shape)}"
        )
    for b, (cn, m) in enumerate(zip(counts.tolist(), sizes, strict=True)):
        if not 0 <= cn <= m:
            raise ValueError(f"pool_boxes: counts[{b}] = {cn} is outside [0, {m}]")
    return counts.to(torch.int64)


def _check_box_dtype(boxes: Tensor, what: str) -> None:
    if boxes.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"pool_boxes: {what} must be a real floating tensor, got {boxes.dtype}")


def boxes_to_rois(
    boxes: Tensor | Sequence[Tensor],
    counts: Tensor | Sequence[int] | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> Tensor:  # (K, 5) [batch_index, x1, y1, x2, y2]
    """Packs the boxes of a whole batch for one RoIAlign call.

    boxes: a list of per-image (M_i, 4) xyxy tensors, or a padded (B, M, 4) tensor whose first
    counts[b] rows are valid for image b (counts=None: all M). With grid_size=(h, w) (or an int),
    boxes are normalised [0, 1] coordinates and are scaled to the h x w feature grid (x by w, y
    by h); with grid_size=None they are already in feature-map units. On the CPU this involves no
    device; with device tensors the padded form syncs (boolean mask).
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"padded boxes must be (B, M, 4), got shape {tuple(boxes.shape)}")
        _check_box_dtype(boxes, "boxes")
        bsz, m = boxes.shape[:2]
        if counts is None:
            mask = torch.ones(bsz, m, dtype=torch.bool, device=boxes.device)
        else:
            cnt = _check_counts(torch.as_tensor(counts), [m] * bsz).to(boxes.device)
            mask = torch.arange(m, device=boxes.device)[None, :] < cnt[:, None]  # (B, M)
        bidx = torch.arange(bsz, device=boxes.device)[:, None].expand(bsz, m)[mask]  # (K,)
        flat = boxes[mask]  # (K, 4)
    else:
        boxes = list(boxes)
        for i, bx in enumerate(boxes):
            if not isinstance(bx, Tensor) or bx.dim() != 2 or bx.shape[1] != 4:
                shape = tuple(bx.shape) if isinstance(bx, Tensor) else type(bx).__name__
                raise ValueError(f"boxes[{i}] must be an (M_{i}, 4) xyxy tensor, got {shape}")
            _check_box_dtype(bx, f"boxes[{i}]")
        if counts is not None:
            cnt = _check_counts(torch.as_tensor(counts), [bx.shape[0] for bx in boxes])
            boxes = [bx[: int(cn)] for bx, cn in zip(boxes, cnt.tolist(), strict=True)]
        device = boxes[0].device if len(boxes) else torch.device("cpu")
        for i, bx in enumerate(boxes):
            if bx.device != device:
                raise ValueError(f"boxes[{i}] is on {bx.device} but boxes[0] is on {device}")
        bidx = torch.cat(
            [torch.full((bx.shape[0],), i, device=device) for i, bx in enumerate(boxes)]
            or [torch.zeros(0, device=device)]
        )
        flat = torch.cat([bx for bx in boxes] or [torch.zeros(0, 4)])
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    flat = flat.to(dtype)
    if grid_size is not None:
        gh, gw = check_output_size(grid_size, "grid_size")
        flat = flat * flat.new_tensor([gw, gh, gw, gh])
    return torch.cat([bidx.to(dtype)[:, None], flat], dim=1)
