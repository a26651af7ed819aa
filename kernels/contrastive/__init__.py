"""Contrastive (InfoNCE / SigLIP) losses that never hold the B x B logits.

reference.py: naive oracle; chunked.py: PyTorch tiles (CPU path); triton_kernels.py + launcher.py:
fused Triton kernels; ops.py: the autograd wrapper and the losses.
"""

from kernels.contrastive.ops import (
    IMPLEMENTATIONS,
    pair_losses,
    positive_logits,
    primitives,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
    stats_to_losses,
    unit_rows,
)
from kernels.contrastive.reference import (
    sigmoid_contrastive_reference,
    softmax_contrastive_reference,
)

__all__ = [
    "IMPLEMENTATIONS",
    "pair_losses",
    "positive_logits",
    "primitives",
    "stats_to_losses",
    "sigmoid_contrastive_loss",
    "sigmoid_contrastive_reference",
    "softmax_contrastive_loss",
    "softmax_contrastive_reference",
    "unit_rows",
]
