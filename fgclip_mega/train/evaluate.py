"""Held-out evaluation inside a training run: a fresh loader over exactly one pass of the
evaluation set (data.eval_shards, or a synthetic set with another seed)."""

from __future__ import annotations

import dataclasses

from fgclip_mega.eval import evaluate, flat, summary_of
from fgclip_mega.family import family


def eval_data_config(run):
    data, state = run.cfg.data, run.state
    return dataclasses.replace(
        data,
        shards=data.eval_shards,
        synthetic_dir=f"{data.synthetic_dir}_eval",
        # Exactly the evaluated samples: each appears once, so retrieval has one true match.
        synthetic_num_samples=run.cfg.train.eval_batches * data.micro_batch_size * state.dp_size,
        seed=data.seed + 1,
        # Every box's phrase is its attribute phrase: box classification and phrase identity.
        region_text="short",
    )


def evaluate_during_training(run, at_step: int, metrics) -> dict[str, float]:
    cfg, state = run.cfg, run.state
    data = eval_data_config(run)
    # One pass at most (the training loaders are endless and would repeat samples).
    loader, batches = family(cfg).eval_loader(
        cfg, state.dp_rank, state.dp_size, run.runtime.device, data, cfg.train.eval_batches
    )
    try:
        if batches < 1:
            raise ValueError(
                f"data.eval_shards={data.shards or data.synthetic_dir}: fewer samples than one "
                f"global batch ({data.micro_batch_size} x {state.dp_size} ranks)"
            )
        full = evaluate(run.model, loader, batches, state.dp_group, runtime=run.runtime)
    finally:
        loader.close()
    # The log takes floats: the headline numbers, per-attribute dicts as 'pairwise_acc.colour'.
    result = flat(summary_of(full))
    result.update({f"eval_{k}": float(v) for k, v in full["sizes"].items()})
    metrics.log_eval(at_step, result)
    return result
