"""A step's batch: the global batch, each rank's micro-batch and the accumulation steps.

    global = micro x DP x accumulation

`train.global_batch_size` 0 keeps one micro-batch per rank per step (global = micro x DP).
`data.micro_batch_size` 0 (auto) takes the largest micro-batch whose step the memory estimate
(profiling/memory.py) fits in the GPU's memory (`train.device_memory_gb`, else the device's own);
with a global batch it must divide the rank's share. An explicit micro-batch is only checked
(Config.validate names the field that breaks the equation). Accumulated steps keep the
contrastive objective over the whole global batch (train/step.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import torch

from fgclip_mega.config import Config, ConfigError
from fgclip_mega.profiling.memory import GIB, MemoryReport, memory_estimate

log = logging.getLogger(__name__)

DEFAULT_DEVICE_MEMORY = 80e9
"""Bytes an automatic micro-batch is sized for without a GPU: an 80 GB H100 / A100."""
MAX_AUTO_MICRO_BATCH = 4096
"""Largest micro-batch tried without a global batch (then powers of two, multiples of 8)."""


@dataclass(frozen=True)
class BatchPlan:
    micro_batch_size: int
    """Samples per rank per forward."""
    accumulation: int
    """Micro-batches per rank per optimizer step."""
    dp_size: int
    """Data-parallel ranks."""
    device_memory: float
    """Bytes the estimate was held against."""
    estimate: MemoryReport
    """Peak memory of one GPU at this micro-batch and accumulation."""

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size * self.accumulation

    @property
    def fits(self) -> bool:
        return self.estimate.total <= self.device_memory

    def describe(self) -> str:
        return (
            f"global batch {self.global_batch_size} = micro-batch {self.micro_batch_size} x "
            f"{self.dp_size} DP ranks x {self.accumulation} accumulation steps; estimated peak "
            f"{self.estimate.total / GIB:.1f} GiB of {self.device_memory / GIB:.1f} GiB"
        )


def device_memory(cfg: Config, device: torch.device | str | None = None) -> float:
    """Bytes of memory per GPU to size for: train.device_memory_gb, else the CUDA device's."""
    if cfg.train.device_memory_gb:
        return cfg.train.device_memory_gb * 1e9
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return float(torch.cuda.get_device_properties(device).total_memory)
    return DEFAULT_DEVICE_MEMORY


def _candidates(per_rank: int | None) -> list[int]:
    """Micro-batches to try, largest first: the divisors of the rank's share of the global
    batch, or without one powers of two and multiples of 8 up to MAX_AUTO_MICRO_BATCH."""
    if per_rank:
        return [m for m in range(per_rank, 0, -1) if per_rank % m == 0]
    sizes = set(range(8, MAX_AUTO_MICRO_BATCH + 1, 8)) | {1, 2, 4}
    return sorted(sizes, reverse=True)


def plan_batch(
    cfg: Config,
    dp_size: int,
    memory: float,
    *,
    stage: str | None = None,
    global_batch_size: int | None = None,
) -> BatchPlan:
    """Micro-batch and accumulation of `cfg` at `dp_size` ranks for `memory` bytes per GPU.
    `stage` / `global_batch_size` default to the config's."""
    g = cfg.train.global_batch_size if global_batch_size is None else global_batch_size
    micro = cfg.data.micro_batch_size
    stage = cfg.train.stage if stage is None else stage
    if g % dp_size:
        raise ConfigError(
            f"train.global_batch_size: {g} is not divisible by the {dp_size} data-parallel ranks"
        )
    per_rank = g // dp_size

    def estimate(m: int) -> MemoryReport:
        accumulation = per_rank // m if per_rank else 1
        return memory_estimate(
            cfg, micro_batch_size=m, accumulation=accumulation, dp_size=dp_size, stage=stage
        )

    if micro:
        if per_rank % micro:
            raise ConfigError(
                f"data.micro_batch_size: train.global_batch_size={g} is not micro_batch_size="
                f"{micro} x {dp_size} data-parallel ranks x a whole number of accumulation steps"
            )
        report = estimate(micro)
        return BatchPlan(micro, report.accumulation, dp_size, memory, report)
    smallest = None
    for m in _candidates(per_rank):
        report = estimate(m)
        if report.total <= memory:
            return BatchPlan(m, report.accumulation, dp_size, memory, report)
        smallest = report
    raise ConfigError(
        f"data.micro_batch_size: auto found no micro-batch that fits {memory / GIB:.1f} GiB: "
        f"even {smallest.micro_batch_size} needs {smallest.total / GIB:.1f} GiB (stage {stage}); "
        "enable parallel.activation_checkpointing, raise parallel.tensor_parallel_size, or set "
        "train.device_memory_gb"
    )


def resolve_batch(cfg: Config, dp_size: int, device=None) -> tuple[Config, BatchPlan]:
    """The trainer's entry point: (cfg with a concrete data.micro_batch_size, the plan)."""
    plan = plan_batch(cfg, dp_size, device_memory(cfg, device))
    if not plan.fits:
        log.warning("data.micro_batch_size=%d may not fit: %s", plan.micro_batch_size,
                    plan.describe())  # fmt: skip
    if cfg.data.micro_batch_size != plan.micro_batch_size:
        log.info("data.micro_batch_size=auto -> %d", plan.micro_batch_size)
        cfg = replace(cfg, data=replace(cfg.data, micro_batch_size=plan.micro_batch_size))
    return cfg, plan
