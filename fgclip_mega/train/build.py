"""Everything a training run holds, built in one place: model (parallelised in
`parallel.wrap.build_parallel_model`), optimizer and schedule, loader, objective, logs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from fgclip_mega.config import Config
from fgclip_mega.family import Family, family
from fgclip_mega.objective import Objective
from fgclip_mega.parallel import ParallelState
from fgclip_mega.parallel.wrap import build_optimizer, build_parallel_model
from fgclip_mega.profiling import PhaseTimer
from fgclip_mega.runtime import Runtime
from fgclip_mega.train.batching import resolve_batch

log = logging.getLogger("fgclip_mega.train")


@dataclass
class TrainingRun:
    cfg: Config
    """The validated configuration."""
    state: ParallelState
    """Ranks and process groups."""
    runtime: Runtime
    """Device, dtypes and kernels."""
    model: torch.nn.Module
    """The FGCLIPModel or FGCLIP2Model (this rank's TP shard)."""
    ddp: torch.nn.Module
    """megatron DDP around the model."""
    optimizer: object
    """megatron optimizer (mixed precision / distributed when configured)."""
    scheduler: object
    """megatron's LR schedule (the config's values win over a checkpoint's)."""
    loader: object
    """The training loader of this DP rank."""
    objective: Objective
    """The stage's loss terms."""
    timer: PhaseTimer
    """Per-phase times."""
    accumulation: int = 1
    """Micro-batches per rank per optimizer step (train/batching.py)."""
    family: Family | None = None
    """The model family's model, loader, forward and weight importer (fgclip_mega/family.py)."""

    def encode(self, batch):
        """The family's forward of one micro-batch to its Embeddings."""
        return self.family.encode(self.model, batch, self.regional)

    @property
    def regional(self) -> bool:
        return self.cfg.train.stage == "regional"

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


def build_training_run(cfg: Config, state: ParallelState) -> TrainingRun:
    """`cfg` with data.micro_batch_size 0 (auto) is resolved here, from the memory estimate for
    this device, and the run's `cfg` holds the resolved value."""
    runtime = state.runtime
    cfg, plan = resolve_batch(cfg, state.dp_size, runtime.device)
    log.info(
        "world %d = TP %d x DP %d; stage %s; %d steps; runtime %s",
        state.world_size,
        state.tp_size,
        state.dp_size,
        cfg.train.stage,
        cfg.train.steps,
        runtime.describe(),
    )
    log.info("%s", plan.describe())
    # Same global seed on every rank before building: replicated weights must match over TP.
    torch.manual_seed(cfg.train.seed)
    model, ddp = build_parallel_model(cfg, state)
    optimizer, scheduler = build_optimizer(
        ddp, cfg.optim, cfg.parallel, runtime, total_steps=cfg.train.steps
    )
    fam = family(cfg)
    loader = fam.build_loader(cfg, state.dp_rank, state.dp_size, runtime.device)
    objective = Objective(
        cfg.loss,
        regional=cfg.train.stage == "regional",
        impl=runtime.contrastive,
        dp_group=state.dp_group,
    )
    return TrainingRun(
        cfg, state, runtime, model, ddp, optimizer, scheduler, loader, objective,
        PhaseTimer(runtime.device), plan.accumulation, fam,
    )  # fmt: skip
