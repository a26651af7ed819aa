"""What every command line of the package does first: rank-aware logging."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging() -> int:
    """INFO on rank 0, WARNING elsewhere, lines tagged with the rank; returns the rank."""
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # megatron-core logs every parameter name and its full optimizer config at INFO, and warns
    # at import that apex/TE are absent (`python -m fgclip_mega.env` reports the fallbacks).
    logging.getLogger("megatron").setLevel(logging.WARNING)
    # torch warns on import that a CPU-only machine has no CUDA runtime (fgclip-env reports it).
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    return rank
