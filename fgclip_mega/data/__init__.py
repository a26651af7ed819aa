"""Data: CLIP tokenizer, zarr shard format, synthetic fine-grained scenes, DALI and PIL loaders.

    from fgclip_mega.data import build_loader, Batch

The public names are imported lazily (PEP 562): DALI's spawned reader processes import
`fgclip_mega.data.source`, which runs this file and must not pull in torch or DALI.
"""

from fgclip_mega.lazy import lazy_exports

_LAZY = {
    "Batch": "fgclip_mega.data.batch",
    "build_loader": "fgclip_mega.data.loader",
    "build_config_loader": "fgclip_mega.data.loader",
    "DaliLoader": "fgclip_mega.data.loader",
    "PilLoader": "fgclip_mega.data.pil_loader",
    "StreamLoader": "fgclip_mega.data.stream",
    "ensure_synthetic_shards": "fgclip_mega.data.embedded",
}
__all__ = sorted(_LAZY)

__getattr__ = lazy_exports(__name__, _LAZY)
