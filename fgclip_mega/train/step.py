"""One optimizer step: forward to embeddings, the objective, backward, DP gradient reduction,
the optimizer and the temperature clamp.

Nothing here reads a device value back to the host except megatron's gradient norm (one sync);
the loss parts stay on the device in one vector that the loop reads at its log interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core.distributed import finalize_model_grads

from fgclip_mega.losses.dispatch import upcast_loss_inputs
from fgclip_mega.train.accumulate import accumulated_backward


@dataclass
class StepOutput:
    names: list[str]
    """Names of the entries of `values`: loss parts and scales, then counts ('n_<term>')."""
    values: torch.Tensor
    """(len(names),) fp32 on the device, detached; read it only when logging."""
    num_parts: int
    """The first num_parts entries are per-rank means, the rest per-rank counts."""
    grad_norm: float
    """Global gradient norm before clipping."""
    lr: float
    """Learning rate this step used."""


def nonfinite_grad_names(model: torch.nn.Module) -> list[str]:
    """Parameters whose (DP-reduced) gradient holds NaN/Inf: the diagnosis of a failed step."""
    bad = []
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None)
        g = p.grad if g is None else g
        if g is not None and not torch.isfinite(g).all():
            bad.append(name)
    return bad


def train_step(run, batch, step: int) -> StepOutput:
    """`run` is a built `TrainingRun` (train/build.py); `step` is the step being taken (1-based).
    `batch` is one micro-batch, or a list of them: the accumulated step keeps the objective over
    all of them (train/accumulate.py)."""
    model, ddp, optimizer, timer = run.model, run.ddp, run.optimizer, run.timer
    batches = list(batch) if isinstance(batch, list | tuple) else [batch]
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    # DP gradient reduction, plus the TP all-reduce of sequence-parallel params' grads (norms
    # see only their sequence slice) that finish_grad_sync alone would miss.
    reduce_grads = lambda: finalize_model_grads([ddp])  # noqa: E731
    upcast = upcast_loss_inputs(run.cfg.precision.loss_in_fp32, run.runtime.device)
    if len(batches) > 1:
        out = accumulated_backward(run, batches, upcast, finish=reduce_grads)
    else:
        with timer.phase("forward"):
            with run.runtime.autocast():
                emb = run.encode(batches[0])
            if upcast:
                emb = emb.float()
            # Outside autocast: the contrastive products must not be recast to bf16.
            out = run.objective(emb, model.temperatures())
        with timer.phase("backward"):
            out.total.backward()
            reduce_grads()
    lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
    with timer.phase("optimizer"):
        ok, grad_norm, _ = optimizer.step()
        run.scheduler.step(1)
        model.clamp_temperatures(run.cfg.loss.max_logit_scale)
    if not ok or (grad_norm is not None and not math.isfinite(grad_norm)):
        names = nonfinite_grad_names(model) or ["(none left after clipping)"]
        raise FloatingPointError(
            f"step {step}: non-finite gradient norm {grad_norm}; parameters with NaN/Inf "
            f"gradients: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}"
        )
    device = out.total.device
    counts = {f"n_{k}": v for k, v in out.counts.items()}
    # A Python count is filled in on the device (a kernel argument): torch.as_tensor of it would
    # be a host->device copy, a stream sync on CUDA.
    values = [v.float().reshape(()) for v in out.parts.values()] + [
        v.float().reshape(()) if isinstance(v, torch.Tensor)
        else torch.full((), v, dtype=torch.float32, device=device)
        for v in counts.values()
    ]  # fmt: skip
    return StepOutput(
        names=[*out.parts, *counts],
        values=torch.stack(values),
        num_parts=len(out.parts),
        grad_norm=float(grad_norm) if grad_norm is not None else math.nan,
        lr=lr,
    )
