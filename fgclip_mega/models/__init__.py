"""FG-CLIP model on megatron-core tensor parallelism. Names load lazily, so the small
`python -m fgclip_mega.models.params` command does not import megatron."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "FGCLIPModel": "fgclip_mega.models.fgclip",
    "is_tp_sharded": "fgclip_mega.models.fgclip",
    "attention": "fgclip_mega.models.attention",
    "resolve_backend": "fgclip_mega.models.attention",
    "stretch_positions": "fgclip_mega.models.text",
    "count_parameters": "fgclip_mega.models.params",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
