"""The FG-CLIP training loop: build, resume, step, log, evaluate, save.

    python -m fgclip_mega.train --preset tiny train.steps=100          # one process (CPU or GPU)
    torchrun --nproc-per-node 8 -m fgclip_mega.train --preset fgclip_vit_b16 \
        parallel.tensor_parallel_size=2 data.shards=/data/index.json

Every rank of a tensor-parallel group reads the same micro-batch (the loader is keyed on the
data-parallel rank); the global losses gather features over the data-parallel group only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch.distributed as dist

from fgclip_mega.checkpoint import training as ckpt
from fgclip_mega.config import Config
from fgclip_mega.parallel import destroy_parallel, init_parallel
from fgclip_mega.parallel.wrap import (
    apply_optimizer_hyperparams,
    start_stage2_temperatures,
    sync_params,
)
from fgclip_mega.profiling import maybe_torch_profiler
from fgclip_mega.train.build import TrainingRun, build_training_run
from fgclip_mega.train.evaluate import evaluate_during_training
from fgclip_mega.train.metrics import MetricsLogger, Throughput
from fgclip_mega.train.preemption import Preemption
from fgclip_mega.train.step import StepOutput, train_step

log = logging.getLogger("fgclip_mega.train")


@dataclass
class TrainResult:
    steps_done: int
    """Optimizer steps taken in this call (after any resume)."""
    last_step: int
    """Global step reached."""
    losses: list[dict[str, float]]
    """Per-step loss parts, in order (every rank gets the same values)."""
    checkpoint: str
    """Directory of the last checkpoint written ('' when none)."""
    evals: list[dict[str, float]]
    """Held-out metrics, one dict per evaluation (with its step)."""
    final: dict[str, float] = field(default_factory=dict)
    """The last logged training record (read back from metrics.jsonl if nothing was trained)."""
    preempted: bool = False
    """Stopped early by SIGTERM/SIGUSR1 after saving."""


def train(cfg: Config, keep_process_groups: bool = False) -> TrainResult:
    cfg.validate()
    cfg.check_paths()  # before any heavy work
    state = init_parallel(cfg, seed=cfg.train.seed)
    try:
        cfg.validate(world_size=state.world_size)
        return run_training(build_training_run(cfg, state))
    finally:
        if not keep_process_groups:
            destroy_parallel()


def resume(run: TrainingRun) -> int:
    """Restores the newest intact checkpoint (if any), at any TP x DP layout; returns the step
    to continue from. A corrupt newer checkpoint is reported and skipped, or stops the run
    (checkpoint.on_corrupt)."""
    cfg = run.cfg
    root = run.output_dir / "checkpoints"
    path = ckpt.find_resume(root, cfg.checkpoint.load, cfg.checkpoint.on_corrupt)
    if path is None:
        return 0
    saver = ckpt.checkpointer(root, run.state, cfg.checkpoint)
    step, saved_cfg = saver.load(
        path, run.model, run.optimizer, run.scheduler, run.loader, run.objective
    )
    apply_optimizer_hyperparams(run.optimizer, cfg.optim)
    saved_cfg = saved_cfg or {}
    # What the config now sets differently from the checkpoint: every optimizer field and the
    # step budget (the schedule follows the config).
    now = {f"optim.{k}": v for k, v in vars(cfg.optim).items()}
    now["train.steps"] = cfg.train.steps
    changed = {}
    for key, value in now.items():
        section, name = key.split(".")
        saved = saved_cfg.get(section, {}).get(name, value)
        if saved != value:
            changed[key] = (saved, value)
    if changed:
        log.warning(
            "resuming with changed settings (saved -> now, now applies): %s",
            ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()),
        )
    start_stage2_temperatures(run.model, cfg, saved_cfg)
    log.info("resumed from %s at step %d", path, step)
    return step


def _read_values(run: TrainingRun, out: StepOutput) -> dict[str, float]:
    """The logged values of a step as global (DP) numbers: means of the parts, sums of the
    counts. The only read of the loss values, at the log interval."""
    values = out.values
    if run.state.dp_size > 1:
        values = values.clone()
        dist.all_reduce(values, group=run.state.dp_group)
        values[: out.num_parts] /= run.state.dp_size
    logged = dict(zip(out.names, values.tolist(), strict=True))
    logged["grad_norm"] = out.grad_norm
    logged["lr"] = out.lr
    return logged


def run_training(run: TrainingRun) -> TrainResult:
    cfg, state = run.cfg, run.state
    rank0 = state.rank == 0
    step = first_step = resume(run)
    metrics = MetricsLogger(
        run.output_dir, cfg.train.steps, enabled=rank0, resume_step=step,
        loggers=cfg.train.loggers, wandb_project=cfg.train.wandb_project,
        run_config=cfg.to_dict(),
    )  # fmt: skip
    losses: list[dict[str, float]] = []
    evals: list[dict[str, float]] = []
    last_ckpt, preempted = "", False

    throughput = Throughput(run)
    stalls: dict[str, float] = {}

    def save(at_step: int) -> str:
        # Waits only for the copy to CPU memory; the files are written in the background.
        saver = ckpt.checkpointer(run.output_dir / "checkpoints", state, cfg.checkpoint)
        path = saver.save(
            at_step, run.model, run.optimizer, run.scheduler, run.loader, cfg.to_dict(), run.ddp,
            run.objective,
        )  # fmt: skip
        if saver.stalls:  # logged with the next record
            stalls["checkpoint_stall_s"] = saver.stalls[-1]
        return str(path)

    def every(interval: int) -> bool:
        return bool(interval) and step % interval == 0

    if step >= cfg.train.steps:
        log.info(
            "already trained to step %d (train.steps=%d): nothing to do", step, cfg.train.steps
        )
    profile_dir = run.output_dir / cfg.train.profile_dir if cfg.train.profile_dir else None
    profile_dir = profile_dir if rank0 else None
    with Preemption() as preemption, maybe_torch_profiler(profile_dir, run.runtime.device) as tick:
        while step < cfg.train.steps:
            with run.timer.phase("data"):
                # train.global_batch_size: `accumulation` micro-batches per rank per step; the
                # loader's position stays a whole number of steps at every checkpoint.
                batches = [next(run.loader).to(run.runtime.device) for _ in range(run.accumulation)]
            batch = batches[-1]
            out = train_step(run, batches if len(batches) > 1 else batch, step + 1)
            step += 1
            metrics.add_samples(sum(len(b) for b in batches) * state.dp_size)
            if every(cfg.train.log_interval) or step in (first_step + 1, cfg.train.steps):
                values = _read_values(run, out)
                losses.append({"step": step, **values})
                values.update(stalls)
                stalls.clear()
                phases = {f"ms_{k}": v for k, v in run.timer.summary_ms().items()}
                run.timer.reset()
                metrics.log(step, values, first_step, throughput.of(batch), phases)
            if every(cfg.checkpoint.save_interval):
                last_ckpt = save(step)
            if cfg.train.eval_batches and every(cfg.train.eval_interval) and step < cfg.train.steps:
                sync_params(run.ddp)
                evals.append({"step": step, **evaluate_during_training(run, step, metrics)})
            tick()
            if preemption.should_stop():
                preempted = True
                break

    sync_params(run.ddp)
    if step > first_step and not last_ckpt.endswith(f"{step:08d}"):
        last_ckpt = save(step)
    ckpt.checkpointer(run.output_dir / "checkpoints", state, cfg.checkpoint).wait()
    run.loader.close()
    if cfg.train.eval_batches and not preempted and not metrics.has_eval(step):
        evals.append({"step": step, **evaluate_during_training(run, step, metrics)})
    final = losses[-1] if losses else metrics.last_record()
    if not evals and metrics.last_eval():
        evals.append(metrics.last_eval())
    metrics.close()  # (an exception before here: the sinks close at exit)
    if rank0:
        plot = metrics.plot()
        if plot:
            log.info("loss curves: %s", plot)
    return TrainResult(step - first_step, step, losses, last_ckpt, evals, final, preempted)


__all__ = ["TrainResult", "resume", "run_training", "train"]
