"""The FG-CLIP training loop: model, DDP, optimizer, loader, losses, checkpoints, logs.

    python -m fgclip_mega.train --preset tiny train.steps=100          # one process (CPU or GPU)
    torchrun --nproc-per-node 8 -m fgclip_mega.train --preset fgclip_vit_b16 \
        parallel.tensor_parallel_size=2 data.shards=/data/index.json

Every rank of a tensor-parallel group reads the same micro-batch (the loader is keyed on the
data-parallel rank); the global losses gather features over the data-parallel group only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.distributed import finalize_model_grads

from fgclip_mega.config import Config
from fgclip_mega.data import build_loader
from fgclip_mega.losses import FGCLIPLoss
from fgclip_mega.models import FGCLIPModel
from fgclip_mega.parallel import ParallelState, destroy_parallel, init_parallel
from fgclip_mega.parallel.wrap import TORCH_DTYPES, build_optimizer, wrap_data_parallel
from fgclip_mega.profiling import PhaseTimer, maybe_torch_profiler
from fgclip_mega.train import checkpointing as ckpt
from fgclip_mega.train.metrics import MetricsLogger
from fgclip_mega.train.step import forward_embeddings

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


def _autocast(cfg: Config, device: torch.device):
    dtype = TORCH_DTYPES[cfg.precision.compute_dtype]
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _clamp_scales(model: FGCLIPModel, max_value: float) -> None:
    # As in CLIP/open_clip: keep every temperature in [0, ln 100] after each update.
    with torch.no_grad():
        for p in (model.logit_scale, model.logit_scale_finegraind, model.logit_scale_hardneg):
            p.clamp_(0.0, max_value)


def _layout(state: ParallelState) -> ckpt.Layout:
    return ckpt.Layout(world_size=state.world_size, tp_size=state.tp_size, dp_size=state.dp_size)


def train(cfg: Config, keep_process_groups: bool = False) -> TrainResult:
    cfg.validate()
    state = init_parallel(cfg.parallel, seed=cfg.train.seed)
    try:
        return _train(cfg, state)
    finally:
        if not keep_process_groups:
            destroy_parallel()


def _train(cfg: Config, state: ParallelState) -> TrainResult:
    cfg.validate(world_size=state.world_size)
    out_dir = Path(cfg.train.output_dir)
    rank0 = state.rank == 0
    device = state.device
    regional = cfg.train.stage == "regional"
    if cfg.loss.kind == "sigmoid":
        # The losses support SigLIP, but the model has no learnable logit bias yet.
        raise NotImplementedError("loss.kind=sigmoid: training a SigLIP logit bias is not built")
    log.info(
        "world %d = TP %d x DP %d on %s; stage %s; %d steps",
        state.world_size,
        state.tp_size,
        state.dp_size,
        device,
        cfg.train.stage,
        cfg.train.steps,
    )

    # Same global seed on every rank before building: replicated weights must match over TP.
    torch.manual_seed(cfg.train.seed)
    model = FGCLIPModel(
        cfg.model,
        cfg.parallel,
        params_dtype=TORCH_DTYPES[cfg.precision.params_dtype],
        compute_dtype=TORCH_DTYPES[cfg.precision.compute_dtype],
        device=device,
    )
    if cfg.checkpoint.init_from:
        from fgclip_mega.checkpoint import import_hf_state_dict

        report = import_hf_state_dict(model, cfg.checkpoint.init_from)
        log.info(
            "initialised from %s (derived: %s)", cfg.checkpoint.init_from, report.get("derived")
        )

    ddp = wrap_data_parallel(model, cfg.parallel, cfg.precision)
    optimizer, scheduler = build_optimizer(
        ddp, cfg.optim, cfg.parallel, cfg.precision, total_steps=cfg.train.steps
    )
    loader = build_loader(
        cfg.data,
        cfg.model.vision.image_size,
        cfg.model.text.short_context,
        cfg.model.text.long_context,
        dp_rank=state.dp_rank,
        dp_size=state.dp_size,
        device=device,
    )
    loss_fn = FGCLIPLoss(cfg.loss, dp_group=state.dp_group)

    eval_batches = cfg.train.eval_batches
    if eval_batches and cfg.data.shards and not cfg.data.eval_shards:
        log.warning("data.shards is set but data.eval_shards is not: evaluation is off")
        eval_batches = 0

    def run_eval(at_step: int) -> dict[str, float]:
        from fgclip_mega.eval import evaluate

        data = cfg.data
        eval_data = dataclasses.replace(
            data,
            shards=data.eval_shards,
            synthetic_dir=f"{data.synthetic_dir}_eval",
            # Exactly the evaluated samples: each appears once, so retrieval has one true match.
            synthetic_num_samples=eval_batches * data.micro_batch_size * state.dp_size,
            seed=data.seed + 1,
        )
        eval_loader = build_loader(
            eval_data,
            cfg.model.vision.image_size,
            cfg.model.text.short_context,
            cfg.model.text.long_context,
            dp_rank=state.dp_rank,
            dp_size=state.dp_size,
            device=device,
        )
        # One pass at most: the loader is endless and would repeat samples.
        per_pass = eval_loader.shards.num_samples // (data.micro_batch_size * state.dp_size)
        batches = min(eval_batches, per_pass)
        if batches < 1:
            raise ValueError("data.eval_shards holds fewer samples than one global batch")
        try:
            with _autocast(cfg, device):
                result = evaluate(model, eval_loader, batches, state.dp_group)
        finally:
            eval_loader.close()
        metrics.log_eval(at_step, result)
        return result

    step = 0
    ckpt_root = out_dir / "checkpoints"
    # This run's own newest checkpoint wins (a restarted run continues where it stopped);
    # checkpoint.load only seeds a run that has none yet.
    resume_from = ckpt.find_latest(ckpt_root)
    if resume_from is None and cfg.checkpoint.load:
        resume_from = ckpt.find_latest(Path(cfg.checkpoint.load))
        if resume_from is None:
            raise ckpt.CheckpointError(
                f"checkpoint.load={cfg.checkpoint.load}: no complete checkpoint there"
            )
    if resume_from is not None:
        step, payload = ckpt.load_checkpoint(resume_from, state.rank, _layout(state))
        model.load_state_dict(payload["model"])
        ckpt.load_optimizer_state(optimizer, payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        loader.load_state_dict(payload["loader"])
        ckpt.load_rng_state(payload["rng"])
        log.info("resumed from %s at step %d", resume_from, step)

    metrics = MetricsLogger(out_dir, cfg.train.steps, enabled=rank0, resume_step=step)
    timer = PhaseTimer()
    losses: list[dict[str, float]] = []
    first_step, last_ckpt = step, ""
    evals: list[dict[str, float]] = []

    def save(at_step: int) -> str:
        payload = {
            "model": model.state_dict(),
            "optimizer": ckpt.optimizer_state(optimizer),
            "scheduler": scheduler.state_dict(),
            "loader": loader.state_dict(),
            "rng": ckpt.rng_state(),
        }
        path = ckpt.save_checkpoint(
            ckpt_root,
            at_step,
            state.rank,
            _layout(state),
            payload,
            cfg.to_dict(),
            cfg.checkpoint.keep_last,
        )
        log.info("saved checkpoint %s", path)
        return str(path)

    def train_step(batch) -> dict[str, float]:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        with timer.phase("forward"):
            with _autocast(cfg, device):
                emb = forward_embeddings(model, batch, regional)
            if cfg.precision.loss_in_fp32:
                emb = emb.float()
            # Outside autocast: the contrastive products must not be recast to bf16.
            total, parts = loss_fn(
                emb,
                logit_scale=model.logit_scale,
                logit_scale_region=model.logit_scale_finegraind,
                logit_scale_hard=model.logit_scale_hardneg,
            )
        with timer.phase("backward"):
            total.backward()
            # DP gradient reduction, plus the TP all-reduce of sequence-parallel params' grads
            # (norms see only their sequence slice) that finish_grad_sync alone would miss.
            finalize_model_grads([ddp])
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        with timer.phase("optimizer"):
            ok, grad_norm, _ = optimizer.step()
            scheduler.step(1)
            _clamp_scales(model, cfg.loss.max_logit_scale)
        # megatron's fp32 optimizer reports ok=True whatever the grads; DDP checks NaN in the
        # gradient reduction (check_for_nan_in_grad), this catches an infinite norm as well.
        if not ok or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise FloatingPointError(f"step {step + 1}: non-finite gradients (norm {grad_norm})")
        names = list(parts)
        # One host transfer for all logged values instead of one sync per value.
        logged = torch.stack([parts[n].float().reshape(()) for n in names] + [total.detach()])
        values = dict(zip([*names, "loss"], logged.tolist(), strict=True))
        values["grad_norm"] = float(grad_norm) if grad_norm is not None else math.nan
        values["lr"] = lr
        return values

    def every(interval: int) -> bool:
        return bool(interval) and step % interval == 0

    profile_dir = Path(cfg.train.profile_dir) if cfg.train.profile_dir and rank0 else None
    with maybe_torch_profiler(profile_dir) as profiler_step:
        while step < cfg.train.steps:
            with timer.phase("data"):
                batch = next(loader).to(device)
            values = train_step(batch)
            step += 1
            losses.append(values)
            metrics.add_samples(len(batch) * state.dp_size)
            if every(cfg.train.log_interval) or step in (first_step + 1, cfg.train.steps):
                metrics.log(step, values, first_step)
            if every(cfg.checkpoint.save_interval):
                last_ckpt = save(step)
            if eval_batches and every(cfg.train.eval_interval) and step < cfg.train.steps:
                evals.append({"step": step, **run_eval(step)})
            profiler_step()

    if not last_ckpt.endswith(f"{step:08d}") and step > first_step:
        last_ckpt = save(step)
    loader.close()
    if eval_batches:
        evals.append({"step": step, **run_eval(step)})
    if rank0:
        plot = metrics.plot()
        log.info("phase ms/step: %s", {k: round(v, 1) for k, v in timer.summary_ms().items()})
        if plot:
            log.info("loss curves: %s", plot)
    return TrainResult(step - first_step, step, losses, last_ckpt, evals)
