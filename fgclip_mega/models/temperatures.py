"""The learnable temperatures both model families carry, as one group: the global, region and
hard-negative logit scales (log temperatures) and SigLIP's logit bias when the model has one.

They stay fp32 whatever the weights' dtype: megatron's mixed-precision optimizer then steps them
in place (no bf16 copy), so clamping the model param clamps the optimizer's main param too, and
their initial values are not rounded through bf16 (2.6592 -> 2.65625).
"""

from __future__ import annotations

import torch
from torch import nn

TEMPERATURES = ("logit_scale", "logit_scale_finegraind", "logit_scale_hardneg")


class Temperatures:
    """Mixin of an nn.Module that owns the temperature parameters."""

    logit_bias: nn.Parameter | None

    def _init_temperatures(self, logit_scale: float, logit_bias: float | None) -> None:
        scale = torch.tensor(logit_scale, dtype=torch.float32)
        self.logit_scale = nn.Parameter(scale.clone())  # global image-text
        self.logit_scale_finegraind = nn.Parameter(scale.clone())  # regions (FG-CLIP's spelling)
        self.logit_scale_hardneg = nn.Parameter(scale.clone())  # hard negatives
        self.logit_bias = None
        if logit_bias is not None:  # SigLIP's learnable bias of the global logits
            self.logit_bias = nn.Parameter(torch.tensor(logit_bias, dtype=torch.float32))

    def _cast_keeping_temperatures(self, device: torch.device, dtype: torch.dtype) -> None:
        """Every weight to (device, dtype) but the temperatures, which keep their exact fp32."""
        exact = {name: p.detach().clone() for name, p in self.temperatures().items()}
        self.to(device=device, dtype=dtype)
        for name, p in self.temperatures().items():
            p.data = exact[name].to(device=p.device)

    def temperatures(self) -> dict[str, nn.Parameter]:
        """The logit scales and, when present, the SigLIP bias: one group for the objective,
        clamping, logging and checkpoint extras."""
        group = {name: getattr(self, name) for name in TEMPERATURES}
        if self.logit_bias is not None:
            group["logit_bias"] = self.logit_bias
        return group

    @torch.no_grad()
    def clamp_temperatures(self, max_logit_scale: float) -> None:
        """As in CLIP/open_clip: every log temperature in [0, max] after each update."""
        for name in TEMPERATURES:
            getattr(self, name).clamp_(0.0, max_logit_scale)

    @torch.no_grad()
    def init_stage2_scales(self, value: float | None = None) -> None:
        """Start of stage 2: the region and hard-negative temperatures take the global one's
        current value (or `value`, e.g. math.log(100))."""
        v = self.logit_scale.detach().clone() if value is None else torch.tensor(value)
        self.logit_scale_finegraind.copy_(v)
        self.logit_scale_hardneg.copy_(v)
