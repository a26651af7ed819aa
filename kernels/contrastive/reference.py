"""Naive contrastive losses over the whole logit matrix: the test oracle and the "naive" baseline.

Written independently of the tiled implementations (plain `F.cross_entropy` / `F.logsigmoid` on
the full (R, C) logits, as OpenCLIP does), in whatever dtype the inputs have, so float64 inputs
give a float64 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softmax_contrastive_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    offset: int = 0,
    symmetric: bool = True,
) -> torch.Tensor:
    """InfoNCE of rows a (R, D) against columns b (C, D); row i's positive is column i + offset.

    symmetric: mean of the row (a->b) and column (b->a) cross-entropies; needs R == C, offset 0.
    """
    logits = scale * (a @ b.T)  # (R, C)
    target = torch.arange(a.shape[0], device=a.device) + offset
    row = F.cross_entropy(logits, target)
    if not symmetric:
        return row
    if a.shape[0] != b.shape[0] or offset != 0:
        raise ValueError("symmetric InfoNCE needs a square batch and offset 0")
    return 0.5 * (row + F.cross_entropy(logits.T, target))


def sigmoid_contrastive_reference(
    a: torch.Tensor,
    b: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    offset: int = 0,
) -> torch.Tensor:
    """SigLIP: -sum_ij log sigmoid(z_ij * (scale a_i.b_j + bias)) / R, z = +1 at (i, i+offset)."""
    logits = scale * (a @ b.T) + bias  # (R, C)
    labels = -torch.ones_like(logits)
    rows = torch.arange(a.shape[0], device=a.device)
    labels[rows, rows + offset] = 1.0
    return -F.logsigmoid(labels * logits).sum() / a.shape[0]
