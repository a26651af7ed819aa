"""Model weights only, from a training checkpoint (layout-free: full parameters by name, so any
TP x DP it was saved with): for evaluation, and for `checkpoint.init_from` (a new run from
another run's weights with a fresh optimizer and schedule, as FG-CLIP's stage 2 starts)."""

from __future__ import annotations

from pathlib import Path

import torch

from fgclip_mega.checkpoint import full_state, integrity
from fgclip_mega.checkpoint.training import newest_intact, read_meta


def training_checkpoint(path: str | Path) -> Path | None:
    """The newest intact step directory at `path` (a step dir, a checkpoints dir, or a run's
    output dir holding checkpoints/); None when `path` is not a training checkpoint."""
    path = Path(path)
    for root in (path, path / "checkpoints"):
        if root.is_dir() and ((root / integrity.MANIFEST).is_file() or any(root.glob("step_*"))):
            found = newest_intact(root, on_corrupt="fallback")
            if found is not None:
                return found
    return None


def saved_config(step_dir: Path) -> dict:
    return read_meta(step_dir).get("config", {})


@torch.no_grad()
def load_training_weights(model: torch.nn.Module, step_dir: Path) -> dict:
    """Copies the (hash-verified) weights of a training checkpoint into `model`, this rank's
    TP slice of each full parameter."""
    manifest = integrity.read_manifest(step_dir)
    state = integrity.load_torch(step_dir, "model.pt", manifest)
    rank, size = model.tp_group.rank(), model.tp_group.size()
    full_state.load_model(model, state, rank, size, str(step_dir / "model.pt"))
    meta = read_meta(step_dir)
    return {"step": int(meta["step"]), "saved_layout": meta.get("layout")}
