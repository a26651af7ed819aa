"""Temperatures keep their exact fp32 start values with bf16 weights (issue 21, item 10).

Casting the model to bf16 and back rounds CLIP's ln(1/0.07) = 2.6592 to 2.65625 and SigLIP's
ln(10) = 2.3026 to 2.296875 (bf16 keeps 8 significant bits). The reference is the config's
Python float in fp32, independent of the model code.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fgclip_mega.config import ParallelConfig
from tests.builders import small_config

INITS = {
    "clip": (2.6592, None),  # FG-CLIP / CLIP: ln(1 / 0.07)
    "siglip": (math.log(10), -10.0),  # SigLIP: scale ln 10, bias -10
}


@pytest.mark.parametrize("kind", list(INITS))
def test_bf16_weights_keep_the_exact_fp32_temperatures(world, kind):
    from fgclip_mega.models import FGCLIPModel

    scale, bias = INITS[kind]
    cfg = dataclasses.replace(small_config(), logit_scale_init=scale, logit_bias_init=bias)
    model = FGCLIPModel(cfg, ParallelConfig(), params_dtype=torch.bfloat16)
    assert model.visual_projection.weight.dtype == torch.bfloat16  # the weights are bf16
    expected = {
        "logit_scale": scale,
        "logit_scale_finegraind": scale,
        "logit_scale_hardneg": scale,
    }
    if bias is not None:
        expected["logit_bias"] = bias
    temps = model.temperatures()
    assert set(temps) == set(expected)
    for name, p in temps.items():
        assert p.dtype == torch.float32, name
        want = torch.tensor(expected[name], dtype=torch.float32)
        assert torch.equal(p.detach(), want), (name, p.item(), want.item())
