"""FG-CLIP model on megatron-core tensor parallelism. Names load lazily, so the small
`python -m fgclip_mega.models.params` command does not import megatron."""

from __future__ import annotations

from fgclip_mega.lazy import lazy_exports

_EXPORTS = {
    "FGCLIPModel": "fgclip_mega.models.fgclip",
    "is_tp_sharded": "fgclip_mega.models.fgclip",
    "attention": "fgclip_mega.models.attention",
    "resolve_backend": "fgclip_mega.models.attention",
    "stretch_positions": "fgclip_mega.models.text",
    "count_parameters": "fgclip_mega.models.params",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
