"""Training checkpoints that are either complete or ignored.

Layout under `<output_dir>/checkpoints/`:
    step_00000040/meta.json          written last by rank 0: step, layout, config
    step_00000040/rank_00003.pt      this rank's model shard, optimizer, scheduler, RNG, loader
    step_00000040.partial/           a save in progress (or interrupted): never loaded
Every rank writes its file atomically (temp file + os.replace); after a barrier rank 0 writes
meta.json and renames the directory, so a crash at any point leaves either the previous
checkpoints or a `.partial` directory that loading skips. Resuming needs the same TP x DP layout
(the file holds per-rank shards); a different layout is an error that names both.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fgclip_mega.checkpoint.errors import CheckpointError

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class Layout:
    world_size: int
    """Processes that wrote the checkpoint."""
    tp_size: int
    """Tensor-parallel size."""
    dp_size: int
    """Data-parallel size."""


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_state(optimizer) -> list[dict[str, Any]]:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    states = []
    for opt in _optimizers(optimizer):
        entry: dict[str, Any] = {"state_dict": opt.state_dict()}
        if isinstance(opt, DistributedOptimizer):
            # This DP rank's shard of Adam moments and fp32 main params, in bucket order.
            entry["param_state"] = _mark_no_padding(opt.get_parameter_state_dp_reshardable())
        states.append(entry)
    return states


def _mark_no_padding(state: dict) -> dict:
    # megatron-core 0.16.1: get_parameter_state_dp_reshardable() omits the per-param 'padding'
    # flag that its inverse, load_parameter_state_from_dp_reshardable(), requires (KeyError).
    for key, per_dtype in state.items():
        if isinstance(key, int):
            for buckets in per_dtype.values():
                for bucket in buckets:
                    for elem in bucket:
                        elem.setdefault("padding", False)
    return state


def _unshare_step_counters(opt) -> None:
    # megatron-core 0.16.1's DistributedOptimizer.load_state_dict (torch-optimizer path) gives
    # every param's Adam state the *same* `step` tensor; torch's AdamW increments it in place
    # once per param, so after a resume the bias correction ran ahead. One tensor per param.
    inner = getattr(opt, "optimizer", None)
    for state in getattr(inner, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def load_optimizer_state(optimizer, states: list[dict[str, Any]]) -> None:
    opts = _optimizers(optimizer)
    if len(opts) != len(states):
        raise CheckpointError(f"optimizer has {len(opts)} parts, checkpoint has {len(states)}")
    for opt, entry in zip(opts, states, strict=True):
        opt.load_state_dict(entry["state_dict"])
        _unshare_step_counters(opt)
        if "param_state" in entry:
            # Without no_grad megatron copies into views of leaf params that require grad.
            with torch.no_grad():
                opt.load_parameter_state_from_dp_reshardable(entry["param_state"])


def rng_state() -> dict[str, Any]:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def load_rng_state(state: dict[str, Any]) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    root: Path,
    step: int,
    rank: int,
    layout: Layout,
    payload: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Collective: every rank calls it with its own payload."""
    root = Path(root)
    final = root / f"step_{step:08d}"
    partial = root / f"step_{step:08d}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    _barrier()
    _atomic_torch_save(payload, partial / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        meta = {"step": step, "layout": vars(layout), "config": config}
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        _prune(root, keep_last)
    _barrier()
    return final


def _complete_steps(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and (path / "meta.json").is_file():
            found.append((int(m.group(1)), path))
    return sorted(found)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for _, path in _complete_steps(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def find_latest(root: Path) -> Path | None:
    """Newest complete checkpoint under root (a step directory itself is also accepted)."""
    root = Path(root)
    if (root / "meta.json").is_file():
        return root
    steps = _complete_steps(root)
    return steps[-1][1] if steps else None


def load_checkpoint(path: Path, rank: int, layout: Layout) -> tuple[int, dict[str, Any]]:
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise CheckpointError(f"{path}: no meta.json, the checkpoint is incomplete")
    meta = json.loads(meta_file.read_text())
    saved = Layout(**meta["layout"])
    if saved != layout:
        raise CheckpointError(
            f"{path}: saved with world_size={saved.world_size}, tp={saved.tp_size}, "
            f"dp={saved.dp_size}; this run has world_size={layout.world_size}, "
            f"tp={layout.tp_size}, dp={layout.dp_size}. Resume with the same layout, or "
            "export the weights (fgclip_mega.checkpoint) and start a new run from them."
        )
    rank_file = path / f"rank_{rank:05d}.pt"
    if not rank_file.is_file():
        raise CheckpointError(f"{rank_file}: missing")
    return int(meta["step"]), torch.load(rank_file, map_location="cpu", weights_only=False)


# ----------------------------------------------------------------------------- the trainer's API


def layout_of(state) -> Layout:
    return Layout(world_size=state.world_size, tp_size=state.tp_size, dp_size=state.dp_size)


def find_resume(root: Path, load: str = "") -> Path | None:
    """The checkpoint a run starts from: this run's own newest one wins (a restarted run
    continues where it stopped); `load` (checkpoint.load) only seeds a run that has none yet."""
    found = find_latest(Path(root))
    if found is None and load:
        found = find_latest(Path(load))
        if found is None:
            raise CheckpointError(f"checkpoint.load={load}: no complete checkpoint there")
    return found


def save_training_state(
    root: Path, step: int, state, model, optimizer, scheduler, loader, cfg
) -> Path:
    """Collective: every rank saves its model shard, optimizer, schedule, RNG and loader."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer_state(optimizer),
        "scheduler": scheduler.state_dict(),
        "loader": loader.state_dict(),
        "rng": rng_state(),
    }
    return save_checkpoint(
        Path(root),
        step,
        state.rank,
        layout_of(state),
        payload,
        cfg.to_dict(),
        cfg.checkpoint.keep_last,
    )


def load_training_state(
    path: Path, state, model, optimizer, scheduler, loader
) -> tuple[int, dict[str, Any]]:
    """Restores everything `save_training_state` wrote; returns (step, the saved config)."""
    step, payload = load_checkpoint(path, state.rank, layout_of(state))
    meta = json.loads((Path(path) / "meta.json").read_text())
    model.load_state_dict(payload["model"])
    load_optimizer_state(optimizer, payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    loader.load_state_dict(payload["loader"])
    load_rng_state(payload["rng"])
    return step, meta.get("config", {})
