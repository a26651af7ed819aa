"""Learned log-temperatures to multiplicative logit scales."""

from __future__ import annotations

import torch


def logit_scale_to_scale(
    logit_scale: torch.Tensor, max_logit_scale: float, learn: bool = True
) -> torch.Tensor:
    """exp(min(logit_scale, max)) as a 0-dim fp32 tensor; no gradient above the clamp (CLIP)."""
    ls = logit_scale if learn else logit_scale.detach()
    return ls.float().reshape(()).clamp(max=max_logit_scale).exp()
