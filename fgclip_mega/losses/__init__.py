"""FG-CLIP losses over data-parallel ranks (kernels in kernels/contrastive)."""

from fgclip_mega.losses.dispatch import resolve_implementation
from fgclip_mega.losses.fgclip import (
    FGCLIPLoss,
    LossInputs,
    LossOutput,
    fgclip_loss,
    hard_negative_loss,
    region_loss,
)
from fgclip_mega.losses.global_loss import global_contrastive_losses
from fgclip_mega.losses.scales import logit_scale_to_scale

__all__ = [
    "FGCLIPLoss",
    "LossInputs",
    "LossOutput",
    "fgclip_loss",
    "global_contrastive_losses",
    "hard_negative_loss",
    "logit_scale_to_scale",
    "region_loss",
    "resolve_implementation",
]
