"""The plain PyTorch definition (float64 in the tests): quick_gelu(y + bias)."""

from __future__ import annotations

import torch

ALPHA = 1.702


def bias_quick_gelu_reference(y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x = y + bias
    return x * torch.sigmoid(ALPHA * x)
