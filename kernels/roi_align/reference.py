# Pure-PyTorch RoIAlign with torchvision semantics: the fallback when the compiled library
# (`bash run/build_ext.sh`) is missing, and a float64 oracle for the tests. Differentiable by
# autograd with respect to the features (boxes are treated as constants, as in torchvision).
#
# Same separable formulation as the C++/CUDA kernels (see roi_align_common.h): each output bin is
# the outer product of a row profile (PH, H) and a column profile (PW, W), built from the
# bilinear weights of the bin's sample points, applied with two einsums. Memory: it gathers the
# features of every box, (K, C, H, W), so it is meant for correctness, not speed.
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _axis_profiles(
    lo: Tensor,  # (K,) box start along the axis, input units
    hi: Tensor,  # (K,) box end
    length: int,  # H or W
    pooled: int,  # PH or PW
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> tuple[Tensor, Tensor]:
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
        grid = torch.ceil(bin_size).to(torch.int64)  # (K,) adaptive samples per bin
    n_samples = max(int(grid.max()), 0) if grid.numel() else 0
    i = torch.arange(n_samples, device=lo.device, dtype=lo.dtype)  # (G,)
    p = torch.arange(pooled, device=lo.device, dtype=lo.dtype)  # (P,)
    g = grid.clamp_min(1).to(lo.dtype)[:, None, None]
    b = bin_size[:, None, None]
    c = start[:, None, None] + p[None, :, None] * b + (i + 0.5)[None, None, :] * b / g  # (K,P,G)
    live = i[None, None, :] < grid[:, None, None]
    valid = live & (c >= -1.0) & (c <= length)  # sample inside [-1, length]
    c = torch.where(valid, c.clamp_min(0.0), torch.zeros_like(c))
    low = c.to(torch.int64)  # c >= 0: truncation == floor
    edge = low >= length - 1
    low = torch.where(edge, torch.full_like(low, length - 1), low)
    high = torch.where(edge, low, low + 1)
    frac = torch.where(edge, torch.zeros_like(c), c - low.to(c.dtype))
    w_low = torch.where(valid, 1.0 - frac, torch.zeros_like(c))
    w_high = torch.where(valid, frac, torch.zeros_like(c))
    prof = torch.zeros(lo.shape[0], pooled, length, dtype=lo.dtype, device=lo.device)
    prof.scatter_add_(2, low, w_low).scatter_add_(2, high, w_high)  # (K, P, length)
    return prof, grid


def roi_align_reference(
    input: Tensor,  # (N, C, H, W)
    rois: Tensor,  # (K, 5) [batch_index, x1, y1, x2, y2] in input pixel units / spatial_scale
    output_size: int | Sequence[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:  # (K, C, PH, PW)
    ph, pw = _pair(output_size)
    n, c, h, w = input.shape
    k = rois.shape[0]
    # fp16/bf16 are computed in fp32 like the compiled kernels; fp64 stays fp64.
    cdt = torch.float64 if input.dtype == torch.float64 else torch.float32
    if k == 0 or h == 0 or w == 0:
        return input.new_zeros((k, c, ph, pw))
    r = rois.detach().to(device=input.device, dtype=cdt)
    bidx = r[:, 0].to(torch.int64)  # truncation toward zero, like torchvision's int cast
    if bool(((bidx < 0) | (bidx >= n)).any()):
        raise ValueError(f"rois[:, 0] holds a batch index outside [0, {n})")
    wy, gy = _axis_profiles(r[:, 2], r[:, 4], h, ph, spatial_scale, sampling_ratio, aligned)
    wx, gx = _axis_profiles(r[:, 1], r[:, 3], w, pw, spatial_scale, sampling_ratio, aligned)
    count = (gy * gx).to(cdt)
    norm = torch.where((gy > 0) & (gx > 0), 1.0 / count.clamp_min(1.0), torch.zeros_like(count))
    feats = input.to(cdt)[bidx]  # (K, C, H, W)
    t = torch.einsum("kchw,kqw->kchq", feats, wx)  # (K, C, H, PW)
    out = torch.einsum("kchq,kph->kcpq", t, wy) * norm[:, None, None, None]  # (K, C, PH, PW)
    return out.to(input.dtype)


def boxes_to_rois(
    boxes: Tensor | Sequence[Tensor],
    counts: Tensor | Sequence[int] | None = None,
    grid_size: int | Sequence[int] | None = None,
) -> Tensor:  # (K, 5) [batch_index, x1, y1, x2, y2]
    """Packs the boxes of a whole batch for one RoIAlign call.

    boxes: a list of per-image (M_i, 4) xyxy tensors, or a padded (B, M, 4) tensor whose first
    counts[b] rows are valid for image b (counts=None: all M). With grid_size=(h, w) (or an int),
    boxes are normalised [0, 1] coordinates and are scaled to the h x w feature grid (x by w, y
    by h); with grid_size=None they are already in feature-map units.
    """
    if isinstance(boxes, Tensor):
        if boxes.dim() != 3 or boxes.shape[-1] != 4:
            raise ValueError(f"padded boxes must be (B, M, 4), got {tuple(boxes.shape)}")
        bsz, m = boxes.shape[:2]
        if counts is None:
            mask = torch.ones(bsz, m, dtype=torch.bool, device=boxes.device)
        else:
            cnt = torch.as_tensor(counts, device=boxes.device)
            mask = torch.arange(m, device=boxes.device)[None, :] < cnt[:, None]  # (B, M)
        bidx = torch.arange(bsz, device=boxes.device)[:, None].expand(bsz, m)[mask]  # (K,)
        flat = boxes[mask]  # (K, 4)
    else:
        if counts is not None:
            boxes = [bx[: int(cn)] for bx, cn in zip(boxes, counts, strict=True)]
        device = boxes[0].device if len(boxes) else torch.device("cpu")
        bidx = torch.cat(
            [torch.full((bx.shape[0],), i, device=device) for i, bx in enumerate(boxes)]
            or [torch.zeros(0, device=device)]
        )
        flat = torch.cat([bx.reshape(-1, 4) for bx in boxes] or [torch.zeros(0, 4)]).to(device)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    flat = flat.to(dtype)
    if grid_size is not None:
        gh, gw = _pair(grid_size)
        flat = flat * flat.new_tensor([gw, gh, gw, gh])
    return torch.cat([bidx.to(dtype)[:, None], flat], dim=1)
