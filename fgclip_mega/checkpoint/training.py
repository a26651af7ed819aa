"""Training checkpoints that are complete, verified, layout-free and written in the background.

Layout under `<output_dir>/checkpoints/`:
    step_00000040/model.pt        full (unsharded) parameters by name          (full_state.py)
    step_00000040/optimizer.pt    full fp32 main params and Adam moments by name
    step_00000040/train.pt        LR schedule, loader position, every rank's RNG
    step_00000040/meta.json       step, layout, config, save stall
    step_00000040/manifest.json   size + sha256 of each file above, written last (integrity.py)
    step_00000040.partial/        a save in progress or interrupted: never loaded, removed later

Saving is a collective: every rank takes part in gathering the full tensors to CPU memory (the
only part the training loop waits for: the "stall", logged and recorded in meta.json), then rank
0 writes the files in a background thread into `.partial`, hashes them, writes the manifest and
renames the directory. The next save, or `wait()` at the end of training, waits for that write. A
process killed at any point leaves the previous checkpoints untouched.

Loading verifies the manifest's hashes (rank 0 picks the checkpoint and broadcasts it): a corrupt
or incomplete newest checkpoint is reported by path and the newest intact one is used instead
(`checkpoint.on_corrupt=fallback`), or the run stops naming the file (`fail`). Because the state
is layout-free, a run may resume at another TP x DP layout; the loader continues from the global
sample position (see `StreamLoader.load_state_dict`). RNG streams are restored only when the
layout is unchanged (they are per rank).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fgclip_mega.checkpoint import full_state, integrity
from fgclip_mega.checkpoint.errors import CheckpointError

log = logging.getLogger("fgclip_mega.checkpoint")

_STEP_DIR = re.compile(r"^step_(\d{8})$")
FILES = ("model.pt", "optimizer.pt", "train.pt", "meta.json")


@dataclass
class Layout:
    world_size: int
    """Processes that wrote the checkpoint."""
    tp_size: int
    """Tensor-parallel size."""
    dp_size: int
    """Data-parallel size."""


def layout_of(state) -> Layout:
    return Layout(world_size=state.world_size, tp_size=state.tp_size, dp_size=state.dp_size)


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
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ----------------------------------------------------------------------------- finding


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Checkpoint directories (complete or not; `.partial` excluded), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name))]
    return sorted(found)


def _candidates(root: Path) -> list[Path]:
    """Newest first; a step directory itself is also accepted."""
    root = Path(root)
    if _STEP_DIR.match(root.name) or (root / integrity.MANIFEST).is_file():
        return [root]
    return [p for _, p in reversed(step_dirs(root))]


def newest_intact(root: Path, on_corrupt: str = "fallback") -> Path | None:
    """The newest checkpoint whose every file matches its manifest. Each corrupt or incomplete
    newer one is logged as a warning naming the file (`fallback`) or raised (`fail`). Raises if
    checkpoints exist but none is intact: silently training from scratch would discard them."""
    problems = []
    for path in _candidates(root):
        try:
            integrity.verify(path)
        except CheckpointError as e:
            if on_corrupt == "fail":
                raise CheckpointError(f"{e} (checkpoint.on_corrupt=fail)") from None
            log.warning("CORRUPT CHECKPOINT skipped: %s", e)
            problems.append(str(e))
            continue
        if problems:
            log.warning(
                "FALLING BACK to the newest intact checkpoint %s (%d newer one(s) unusable)",
                path,
                len(problems),
            )
        return path
    if problems:
        raise CheckpointError(
            f"{root}: no intact checkpoint to resume from: " + "; ".join(problems)
        )
    return None


def find_resume(root: Path, load: str = "", on_corrupt: str = "fallback") -> Path | None:
    """Collective. The checkpoint a run starts from: this run's own newest intact one wins (a
    restarted run continues where it stopped); `load` (checkpoint.load) only seeds a run that has
    none yet. Rank 0 reads and verifies; every rank gets its answer (or its error)."""
    answer: tuple[str, str] = ("", "")
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            found = newest_intact(Path(root), on_corrupt)
            if found is None and load:
                found = newest_intact(Path(load), on_corrupt)
                if found is None:
                    raise CheckpointError(f"checkpoint.load={load}: no checkpoint there")
            answer = (str(found) if found else "", "")
        except CheckpointError as e:
            answer = ("", str(e))
    path, error = _broadcast(answer)
    if error:
        raise CheckpointError(error)
    return Path(path) if path else None


# ----------------------------------------------------------------------------- saving


class Checkpointer:
    """Saves (asynchronously) and loads training checkpoints under `root` for one run."""

    def __init__(self, root: Path, state, keep_last: int = 2, async_save: bool = True):
        self.root = Path(root)
        self.state = state
        self.keep_last = keep_last
        self.async_save = async_save
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.stalls: list[float] = []
        """Seconds the training loop waited for each save (gather + copy + previous write)."""

    @property
    def rank0(self) -> bool:
        return self.state.rank == 0

    def wait(self) -> None:
        """Collective: the write in flight (if any) is complete and visible to every rank; a
        failed background write raises here."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        failed = _broadcast(f"{type(error).__name__}: {error}" if error else "")
        if failed:
            raise CheckpointError(f"writing a checkpoint under {self.root} failed: {failed}")
        _barrier()

    def save(
        self, step: int, model, optimizer, scheduler, loader, config: dict, ddp=None,
        objective=None,
    ) -> Path:  # fmt: skip
        """Collective. Returns the final directory (complete once the write finishes).
        `objective`: its running state (FG-CLIP 2's CMR margin, the same on every rank) is
        saved with the loader's."""
        t0 = time.perf_counter()
        self.wait()
        st = self.state
        model_state = full_state.gather_model(model, st.tp_group)
        optim_state = full_state.gather_optimizer(optimizer, model, st.tp_group, st.dp_group)
        ddp_cfg = getattr(ddp, "ddp_config", None)
        if getattr(ddp_cfg, "overlap_param_gather", False):
            # The all-gather of other DP ranks' updated ranges runs in the next forward, so the
            # params are stale now; the gathered main params cast to the param dtype are what
            # that all-gather will deliver (megatron copies main -> param buffer the same way).
            # Frozen parameters (family.freeze_unused) have no main copy: they are as they are.
            trained = {n for n, p in model.named_parameters() if p.requires_grad}
            for name, t in model_state.items():
                if name in trained:
                    model_state[name] = optim_state["tensors"][name]["param"].to(t.dtype)
        rngs = [None] * st.world_size
        if dist.is_initialized() and st.world_size > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        train_state = {
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "rng": rngs,
        }
        if objective is not None and objective.state:
            train_state["objective"] = {k: v.detach().cpu() for k, v in objective.state.items()}
        stall = time.perf_counter() - t0
        self.stalls.append(stall)
        final = self.root / f"step_{step:08d}"
        meta = {
            "format": integrity.FORMAT,
            "step": step,
            "layout": vars(layout_of(st)),
            "checkpoint_stall_s": stall,
            "config": config,
        }
        log.info(
            "checkpoint step %d: stall %.3f s (gather to CPU%s), checkpoint_stall_s=%.3f",
            step,
            stall,
            "; files written in the background" if self.async_save else "",
            stall,
        )
        if self.rank0:
            payload = (final, model_state, optim_state, train_state, meta)
            if self.async_save:
                self._thread = threading.Thread(
                    target=self._write_guarded, args=payload, name=f"ckpt-{step}", daemon=True
                )
                self._thread.start()
            else:
                self._write(*payload)
        if not self.async_save:
            _barrier()
        return final

    def _write_guarded(self, *payload) -> None:
        try:
            self._write(*payload)
        except BaseException as e:  # noqa: BLE001 - reported by wait()
            log.error("checkpoint write %s failed: %s", payload[0], e)
            self._error = e

    def _write(self, final: Path, model_state, optim_state, train_state, meta) -> None:
        t0 = time.perf_counter()
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        entries = {
            "model.pt": integrity.write_file(partial / "model.pt", model_state),
            "optimizer.pt": integrity.write_file(partial / "optimizer.pt", optim_state),
            "train.pt": integrity.write_file(partial / "train.pt", train_state),
            "meta.json": integrity.write_json(partial / "meta.json", meta),
        }
        integrity.write_manifest(partial, entries, meta["step"])
        if final.exists():  # the same step saved again (e.g. a rerun): replace it
            stale = final.with_name(final.name + ".stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(partial, final)
        self._prune()
        log.info("saved checkpoint %s (write %.2f s)", final, time.perf_counter() - t0)

    def _prune(self) -> None:
        for _, path in step_dirs(self.root)[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)
        # Leftovers of saves killed mid-write (only one write runs at a time: not ours).
        for path in self.root.iterdir():
            if path.name.endswith((".partial", ".stale")):
                shutil.rmtree(path, ignore_errors=True)

    # ------------------------------------------------------------------------- loading

    def load(
        self, path: Path, model, optimizer, scheduler, loader, objective=None
    ) -> tuple[int, dict]:
        """Collective. Restores everything `save` wrote at this run's layout; returns (step,
        the saved config). Every file is verified against the manifest first."""
        path = Path(path)
        st = self.state
        manifest = integrity.read_manifest(path)
        meta = integrity.load_json(path, "meta.json", manifest)
        model_state = integrity.load_torch(path, "model.pt", manifest)
        optim_state = integrity.load_torch(path, "optimizer.pt", manifest)
        train_state = integrity.load_torch(path, "train.pt", manifest)
        where = str(path)
        full_state.load_model(model, model_state, st.tp_group.rank(), st.tp_size, where)
        full_state.load_optimizer(
            optimizer, model, optim_state, st.tp_group.rank(), st.tp_size, where
        )
        scheduler.load_state_dict(train_state["scheduler"])
        data = train_state["loader"]
        if data.get("dp_size") != st.dp_size:
            log.warning(
                "data-parallel size %s -> %d: the samples of epoch %d that no old rank read are "
                "split over the new ranks (a transition epoch), then normal epochs follow",
                data.get("dp_size"),
                st.dp_size,
                data["epoch"],
            )
        try:
            loader.load_state_dict(train_state["loader"])
        except ValueError as e:
            raise CheckpointError(f"{path / 'train.pt'}: loader state: {e}") from None
        if objective is not None:
            device = next(model.parameters()).device
            for key, value in train_state.get("objective", {}).items():
                objective.state[key] = value.to(device)
        saved = Layout(**meta["layout"])
        if saved == layout_of(st):
            load_rng_state(train_state["rng"][st.rank])
        else:
            log.warning(
                "resuming %s saved at TP %d x DP %d on TP %d x DP %d: weights, optimizer and "
                "data position carry over exactly; RNG streams restart from the seed",
                path,
                saved.tp_size,
                saved.dp_size,
                st.tp_size,
                st.dp_size,
            )
        return int(meta["step"]), meta.get("config", {})


_ACTIVE: dict[str, Checkpointer] = {}


def checkpointer(root: Path, state, ckpt_cfg) -> Checkpointer:
    """The Checkpointer of `root` in this process (kept between saves, so a write in flight is
    waited for); a new run on the same root (new process groups) gets a new one."""
    key = str(Path(root).resolve())
    current = _ACTIVE.get(key)
    if current is None or current.state is not state:
        if current is not None and current._thread is not None:
            current._thread.join()
        current = Checkpointer(root, state, ckpt_cfg.keep_last, ckpt_cfg.async_save)
        _ACTIVE[key] = current
    return current


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a checkpoint, verified."""
    manifest = integrity.read_manifest(Path(path))
    return integrity.load_json(Path(path), "meta.json", manifest)


__all__ = [
    "Checkpointer",
    "Layout",
    "checkpointer",
    "find_resume",
    "layout_of",
    "newest_intact",
    "read_meta",
    "step_dirs",
]
