"""Start torch.distributed and megatron-core's process groups; tear them down cleanly.

Launch with torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the
environment) or as a plain `python` process, which becomes a world of one. The process groups
are owned by megatron-core's `parallel_state`; `ParallelState` hands them to the code that needs
them explicitly.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fgclip_mega import runtime as rt
from fgclip_mega.config import Config, ParallelConfig
from fgclip_mega.parallel import cpu_compat, mcore_patches

_log = logging.getLogger(__name__)


@dataclass
class ParallelState:
    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    tp_rank: int
    """Rank inside the tensor-parallel group."""
    tp_size: int
    """Tensor-parallel group size."""
    dp_rank: int
    """Rank inside the data-parallel group."""
    dp_size: int
    """Data-parallel group size."""
    tp_group: dist.ProcessGroup
    """Tensor-parallel process group."""
    dp_group: dist.ProcessGroup
    """Data-parallel process group."""
    device: torch.device
    """Where this rank computes."""
    backend: str
    """torch.distributed backend in use."""
    runtime: rt.Runtime | None = None
    """Device, dtypes and resolved kernels of the run (when init_parallel got the Config)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    backend: str = "auto", timeout_minutes: int = 10, tensor_parallel_size: int = 1
) -> tuple[int, int]:
    """Initialises the default process group from torchrun's environment (or a world of one)."""
    if tensor_parallel_size > 1:
        # One hardware queue per device: TP collectives are then issued in program order and
        # overlap with compute as megatron schedules them. Read when CUDA initialises, so it is
        # set before torch.cuda.set_device (and before anything else touches CUDA).
        previous = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
        if previous not in (None, "1"):
            _log.warning("CUDA_DEVICE_MAX_CONNECTIONS=%s replaced by 1 for TP", previous)
        os.environ["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    launched = "RANK" in os.environ  # by torchrun (or srun with its variables)
    rank = int(os.environ["RANK"]) if launched else 0
    world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    if backend == "auto":
        backend = "nccl" if rt.cuda_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    # A world of one rendezvous on a free local port without writing torchrun's variables into
    # the environment, where child processes (a launcher, a test's subprocess) would inherit them.
    init_method = None if launched else f"tcp://127.0.0.1:{_free_port()}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
    )
    return rank, world_size


def init_parallel(
    cfg: ParallelConfig | Config, seed: int = 42, *, with_decode: bool = True
) -> ParallelState:
    """torch.distributed, then TP x DP groups and the model-parallel RNG tracker. Given the whole
    `Config`, also resolves the run's `Runtime` (device, dtypes, kernels) into `state.runtime`."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    config = cfg if isinstance(cfg, Config) else None
    cfg = config.parallel if config is not None else cfg
    rank, world_size = init_distributed(cfg.backend, cfg.timeout_minutes, cfg.tensor_parallel_size)
    cfg.data_parallel_size(world_size)  # validates that TP divides the world
    if not rt.cuda_available():
        cpu_compat.enable()
    mcore_patches.install()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(
            tensor_model_parallel_size=cfg.tensor_parallel_size,
            distributed_timeout_minutes=cfg.timeout_minutes,
        )
    # Same seed on every rank of a TP group for the "model-parallel" stream offsets; TP ranks
    # get different dropout inside sharded regions and identical dropout outside them.
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    device = rt.default_device()
    rt.configure_device(device)
    runtime = None
    if config is not None:
        runtime = rt.resolve_runtime(config, device, with_decode=with_decode)
    return ParallelState(
        rank=rank,
        world_size=world_size,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        device=device,
        backend=dist.get_backend(),
        runtime=runtime,
    )


def destroy_parallel() -> None:
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    cpu_compat.disable()
