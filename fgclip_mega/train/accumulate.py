"""Gradient accumulation that keeps the contrastive objective over the whole global batch.

Summing per-micro-batch losses would change FG-CLIP's objective: each micro-batch's InfoNCE
would see only micro x DP negatives instead of the global batch's. Instead (GradCache, Gao et
al. 2021):
  1. every micro-batch of the step is encoded without autograd, recording the RNG state its
     forward starts from;
  2. the embeddings are concatenated and the objective runs once over all of them (and over all
     DP ranks through its gathers), with gradients w.r.t. the embeddings and the temperatures;
  3. each micro-batch is encoded again with autograd from its recorded RNG state (the same
     forward, so the same embeddings) and back-propagates its slice of the embedding gradient.
The parameter gradients are exactly those of one step over the concatenated batch. megatron
DDP reduces them once: every backward but the last runs under `ddp.no_sync()`, and the last one
also carries the temperatures' gradients, so that each parameter is ready for its bucket's
reduction exactly once per step (what megatron's overlapped reduction counts on).

Memory: one micro-batch's activations at a time plus the cached embeddings of the rank's batch
(profiling/memory.py `grad_cache_bytes`); cost: one extra forward of every micro-batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields

import torch

from fgclip_mega.objective import Embeddings, ObjectiveOutput


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    # The default generators are what a forward may draw from (CLIP has no dropout, so
    # megatron's model-parallel RNG tracker is never used).
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def concat_embeddings(parts: list[Embeddings]) -> Embeddings:
    """The micro-batches' embeddings as one batch, rows in micro-batch order (the order a single
    micro-batch of all their samples would have)."""
    out = {}
    for f in fields(Embeddings):
        values = [getattr(p, f.name) for p in parts]
        if all(v is None for v in values):
            out[f.name] = None
        elif f.name == "hard_valid":  # None = all negatives real
            k = next(v for v in values if v is not None).shape[1]
            out[f.name] = torch.cat([
                v if v is not None else torch.ones(p.hard_text.shape[0], k, dtype=torch.bool,
                                                   device=p.hard_text.device)
                for v, p in zip(values, parts, strict=True)
            ])  # fmt: skip
        else:
            out[f.name] = torch.cat(values)
    return Embeddings(**out)


def _differentiable(emb: Embeddings) -> list[str]:
    return [
        f.name
        for f in fields(Embeddings)
        if getattr(emb, f.name) is not None and getattr(emb, f.name).is_floating_point()
    ]


def accumulated_backward(run, batches: list, upcast: bool, finish=None) -> ObjectiveOutput:
    """Forward, objective and backward of one step over `batches` (this rank's micro-batches):
    megatron's buffers get the gradients `out.total.backward()` of one micro-batch holding all
    their samples would give. `upcast`: the embeddings go into the objective as fp32;
    `finish()` (the DP reduction) ends the backward phase."""
    model, ddp, timer = run.model, run.ddp, run.timer
    device = run.runtime.device
    states, cached = [], []
    with timer.phase("forward"):
        for batch in batches:
            states.append(_rng_state(device))
            with torch.no_grad(), run.runtime.autocast():
                cached.append(run.encode(batch))
        after = _rng_state(device)
        emb = concat_embeddings(cached)
        if upcast:
            emb = emb.float()
        names = _differentiable(emb)
        for name in names:
            setattr(emb, name, getattr(emb, name).detach().requires_grad_(True))
        temps = [p for p in model.temperatures().values() if p.requires_grad]
        # Outside autocast: the contrastive products must not be recast to bf16.
        out = run.objective(emb, model.temperatures())
    with timer.phase("backward"):
        leaves = [getattr(emb, n) for n in names]
        grads = torch.autograd.grad(out.total, leaves + temps, allow_unused=True)
        emb_grads = dict(zip(names, grads[: len(names)], strict=True))
        temp_grads = [
            (p, g) for p, g in zip(temps, grads[len(names) :], strict=True) if g is not None
        ]
        sizes = {n: [getattr(c, n).shape[0] for c in cached] for n in names}
        slices = {
            n: (g.split(sizes[n]) if g is not None else [None] * len(batches))
            for n, g in emb_grads.items()
        }
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            with contextlib.nullcontext() if last else ddp.no_sync():
                _set_rng_state(states[i], device)
                with run.runtime.autocast():
                    part = run.encode(batch)
                if upcast:
                    part = part.float()
                roots, root_grads = [], []
                for n in names:
                    if slices[n][i] is not None:
                        roots.append(getattr(part, n))
                        root_grads.append(slices[n][i])
                if last:  # the temperatures' gradients join the backward that is reduced
                    roots += [p for p, _ in temp_grads]
                    root_grads += [g for _, g in temp_grads]
                torch.autograd.backward(roots, root_grads)
        _set_rng_state(after, device)
        if finish is not None:
            finish()
    return out
