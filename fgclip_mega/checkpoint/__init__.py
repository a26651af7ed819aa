"""Training checkpoints, HF / FG-CLIP weight interop and export. Names load lazily, so a command
line such as `fgclip-export --help` does not import torch or megatron."""

from __future__ import annotations

from fgclip_mega.lazy import lazy_exports

_EXPORTS = {
    "CheckpointError": "fgclip_mega.checkpoint.errors",
    "clip_config": "fgclip_mega.checkpoint.hf_config",
    "export_hf_state_dict": "fgclip_mega.checkpoint.hf",
    "hf_state_from_full": "fgclip_mega.checkpoint.hf",
    "import_hf_state_dict": "fgclip_mega.checkpoint.hf",
    "key_map": "fgclip_mega.checkpoint.hf",
    "load_state_dict": "fgclip_mega.checkpoint.hf",
    "save_state_dict": "fgclip_mega.checkpoint.hf",
}
__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
