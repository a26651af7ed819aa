"""Contrastive (InfoNCE / SigLIP) losses that never hold the B x B logits.

reference.py: naive oracle; chunked.py: PyTorch tiles (CPU path); triton_kernels.py + launcher.py:
fused Triton kernels; ops.py: the autograd wrapper and the losses.
"""

from kernels.contrastive.ops import (
    IMPLEMENTATIONS,
    pair_stats,
    positive_dots,
    primitives,
    sigmoid_contrastive_loss,
    softmax_contrastive_loss,
)
from kernels.contrastive.reference import (
    sigmoid_contrastive_reference,
    softmax_contrastive_reference,
)

__all__ = [
    "IMPLEMENTATIONS",
    "pair_stats",
    "positive_dots",
    "primitives",
    "sigmoid_contrastive_loss",
    "sigmoid_contrastive_reference",
    "softmax_contrastive_loss",
    "softmax_contrastive_reference",
]
