from fgclip_mega.checkpoint.errors import CheckpointError
from fgclip_mega.checkpoint.hf import (
    export_hf_state_dict,
    import_hf_state_dict,
    key_map,
    load_state_dict,
    save_state_dict,
)
from fgclip_mega.checkpoint.hf_config import clip_config

__all__ = [
    "CheckpointError",
    "clip_config",
    "export_hf_state_dict",
    "import_hf_state_dict",
    "key_map",
    "load_state_dict",
    "save_state_dict",
]
