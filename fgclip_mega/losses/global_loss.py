"""Image-text contrastive losses over the global (all data-parallel ranks) batch.

Convention: with W data-parallel ranks holding b samples each (equal b on every rank), rank r
returns L_r = its local rows' share of the global loss, normalised by b:
  softmax: L_r = 1/2 (1/b sum_{i in r} CE(image_i -> all W*b texts)
                    + 1/b sum_{j in r} CE(text_j -> all W*b images)),
  sigmoid: L_r = 1/b sum_{i in r} sum_{j < W*b} -log sigmoid(z_ij (s x_i.y_j + t)).
Then mean_r L_r is exactly the single-process loss L over the concatenated batch. Gradients flow
back to the rank that owns each feature, so the gradient of this rank's features is
W * (its slice of dL/dfeatures) = dsum_r L_r / dfeatures, and the scale/bias gradient is dL_r/ds.
Averaging parameter gradients over data-parallel ranks (what DDP does) therefore gives exactly
the single-process gradient dL/dtheta.
Collectives per call, independent of how many text sets share the image features (plus one tiny
all-gather of the feature shapes, which must agree over ranks):
  allgather: one all_gather_into_tensor forward, one reduce_scatter_tensor backward;
  ring: W - 1 isend/irecv pairs forward, 2W - 1 backward (see ring.py), overlapped with compute.
"""

from __future__ import annotations

import torch

from fgclip_mega.losses.collectives import (
    all_gather_with_grad,
    check_same_shape,
    group_size_rank,
)
from fgclip_mega.losses.ring import ring_pair_losses
from kernels.contrastive import (
    pair_losses,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
    unit_rows,
)


def global_contrastive_losses(
    image: torch.Tensor,
    texts: list[torch.Tensor],
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    kind: str = "softmax",
    impl: str = "chunked",
    chunk_size: int = 1024,
    gather: str = "allgather",
    group=None,
) -> list[torch.Tensor]:
    """This rank's L_r of image (b, D) against each text set (b, D) in `texts`.

    Features are L2-normalised here. scale is the multiplicative logit scale (0-dim, already
    clamped and exponentiated); bias is the SigLIP logit bias (sigmoid only).
    """
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"kind must be softmax or sigmoid, got {kind!r}")
    if kind == "sigmoid" and bias is None:
        raise ValueError("the sigmoid loss needs a logit bias")
    if gather not in ("allgather", "ring"):
        raise ValueError(f"gather must be allgather or ring, got {gather!r}")
    # In the embeddings' dtype (bf16 on GPUs), normalised in fp32: the kernels accumulate in fp32.
    img = unit_rows(image)  # (b, D)
    txts = [unit_rows(t) for t in texts]
    for t in txts:
        if t.shape != img.shape:
            raise ValueError(f"text {tuple(t.shape)} and image {tuple(img.shape)} differ")
    if bias is None:
        bias = torch.zeros((), device=img.device)
    size, _ = group_size_rank(group)
    b, D = img.shape
    opts = dict(impl=impl, chunk_size=chunk_size)

    if size == 1:
        if kind == "softmax":
            return [softmax_contrastive_loss(img, t, scale, **opts) for t in txts]
        return [sigmoid_contrastive_loss(img, t, scale, bias, **opts) for t in txts]

    check_same_shape(img, group, "image features of the global loss")
    # Columns other ranks need: softmax both directions (image and every text set), sigmoid
    # (one direction, image rows) only the texts. Packed so one collective moves them all.
    if kind == "softmax":
        block = torch.cat([img, *txts], 1)  # (b, (1 + n) D): slot 0 image, slot k text k
        pairs = [p for k in range(len(txts)) for p in ((0, k + 1), (k + 1, 0))]
    else:
        block = torch.cat(txts, 1)  # (b, n D)
        pairs = [(0, k) for k in range(len(txts))]
    rows = [img, *txts]

    if gather == "allgather":
        _, rank = group_size_rank(group)
        cols = all_gather_with_grad(block, group).split(D, 1)  # each (W b, D)
        per_row = [
            pair_losses(rows[p], cols[q], scale, bias, kind=kind, offset=rank * b, **opts)[0]
            for p, q in pairs
        ]
    else:
        per_row = ring_pair_losses(
            rows,
            block,
            pairs,
            scale,
            bias,
            kind=kind,
            impl=impl,
            chunk_size=chunk_size,
            group=group,
        )
    if kind == "softmax":  # image->text and text->image cross-entropies per text set
        return [0.5 * (per_row[2 * k].mean() + per_row[2 * k + 1].mean()) for k in range(len(txts))]
    return [per_row[k].mean() for k in range(len(txts))]
