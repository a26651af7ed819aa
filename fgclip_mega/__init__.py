"""fgclip_mega: Megatron-style distributed training for FG-CLIP (fine-grained CLIP)."""

__version__ = "0.1.0"
