"""Parameter counts of the presets, as JSON lines:

    python -m fgclip_mega.models.params            # every preset
    python -m fgclip_mega.models.params tiny       # one

`clip` is what transformers' CLIPModel of the same config has; `fgclip_extras` are the two
248-row position tables, text_filip_projection and the two extra temperatures.
"""

from __future__ import annotations

import json
import sys

from fgclip_mega.config import ModelConfig
from fgclip_mega.presets import PRESETS


def _block(d: int, mlp: int) -> int:
    attn = 4 * (d * d + d)  # q, k, v, out_proj with biases
    return attn + (d * mlp + mlp) + (mlp * d + d) + 2 * 2 * d  # fc1, fc2, two LayerNorms


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    v, t, p = cfg.vision, cfg.text, cfg.projection_dim
    vision = (
        3 * v.patch_size**2 * v.width  # conv, no bias
        + v.width  # class token
        + (v.grid_size**2 + 1) * v.width  # positions
        + 2 * 2 * v.width  # pre/post LayerNorm
        + v.layers * _block(v.width, v.mlp_width)
    )
    text = (
        t.vocab_size * t.width
        + t.short_context * t.width
        + 2 * t.width  # final LayerNorm
        + t.layers * _block(t.width, t.mlp_width)
    )
    projections = (v.width + t.width) * p
    clip = vision + text + projections + 1  # + logit_scale
    extras = 2 * t.long_context * t.width + t.width * p + 2
    return {
        "vision": vision,
        "text": text,
        "projections": projections,
        "clip": clip,
        "fgclip_extras": extras,
        "total": clip + extras,
    }


def main(argv: list[str]) -> None:
    names = argv or sorted(PRESETS)
    for name in names:
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        print(json.dumps({"preset": name, **count_parameters(PRESETS[name]().model)}))


if __name__ == "__main__":
    main(sys.argv[1:])
