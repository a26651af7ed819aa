"""FG-CLIP loss math over data-parallel ranks (kernels in kernels/contrastive); the objective
layer (fgclip_mega/objective) combines the terms."""

from fgclip_mega.losses.dispatch import resolve_implementation
from fgclip_mega.losses.fgclip import hard_negative_loss, region_loss, zero_loss
from fgclip_mega.losses.global_loss import global_contrastive_losses
from fgclip_mega.losses.scales import logit_scale_to_scale

__all__ = [
    "global_contrastive_losses",
    "hard_negative_loss",
    "logit_scale_to_scale",
    "region_loss",
    "resolve_implementation",
    "zero_loss",
]
