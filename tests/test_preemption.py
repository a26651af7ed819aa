"""Preemption without a per-step barrier (issue 21, item 9).

Ranks agree on a stop with a MAX all-reduce of a signal flag. A blocking reduction after every
step holds each rank's host until the slowest rank arrives, so its GPU idles; the reduction is
now started without waiting and read one step later. Checked in spawned gloo ranks: no blocking
reduction of the flag in any step (counted by wrapping `dist.all_reduce`), and a SIGTERM on one
rank still stops every DP rank at the same step, with a checkpoint of that step.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

from tests.builders import train_config
from tests.distributed import run_distributed


def _count_flag_reductions() -> tuple[list[bool], object]:
    """Wraps dist.all_reduce: records async_op of each call made from train/preemption.py.
    Returns (the record, a function restoring the original)."""
    import torch.distributed as dist

    calls: list[bool] = []
    real = dist.all_reduce

    def wrapped(*args, **kwargs):
        caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
        if caller.endswith("fgclip_mega/train/preemption.py"):
            calls.append(bool(kwargs.get("async_op", False)))
        return real(*args, **kwargs)

    dist.all_reduce = wrapped
    return calls, lambda: setattr(dist, "all_reduce", real)


def _stop_steps(signal_steps: dict[int, int]) -> dict:
    """Each rank runs 8 'steps', raising SIGTERM on itself at its step in `signal_steps`."""
    import torch.distributed as dist

    from fgclip_mega.parallel.bootstrap import init_distributed
    from fgclip_mega.train.preemption import Preemption

    rank, _ = init_distributed("gloo")
    calls, restore = _count_flag_reductions()
    stopped = None
    try:
        with Preemption() as preemption:
            for step in range(1, 9):
                if signal_steps.get(rank) == step:
                    signal.raise_signal(signal.SIGTERM)
                if preemption.should_stop():
                    stopped = step
                    break
            requested = preemption.requested
    finally:
        restore()
    dist.barrier()
    return {"stopped": stopped, "requested": requested, "calls": calls}


def test_ranks_stop_at_the_same_step_without_a_blocking_reduction():
    # One group, two cases run one after the other: a signal on rank 1 only, then on both ranks
    # at different steps.
    for signal_steps in ({1: 3}, {0: 2, 1: 5}):
        results = run_distributed(_stop_steps, 2, signal_steps)
        first = min(signal_steps.values())
        stops = [r["stopped"] for r in results]
        assert stops[0] == stops[1] and stops[0] in (first, first + 1), (signal_steps, stops)
        assert all(r["requested"] == signal.SIGTERM for r in results)
        for r in results:
            blocking = r["calls"].count(False)
            assert blocking == 0, f"{blocking} blocking flag reductions in {stops[0]} steps"


def _train_with_sigterm(tmp: str) -> dict:
    import torch.distributed as dist

    import fgclip_mega.train.loop as loop
    from fgclip_mega.checkpoint import training as ckpt

    tmp = Path(tmp)
    rank = dist.get_rank() if dist.is_initialized() else int(__import__("os").environ["RANK"])
    real = loop.train_step

    def step_then_signal(run, batch, step):
        out = real(run, batch, step)
        if step == 2 and run.state.rank == 1:  # only rank 1 is told to stop
            signal.raise_signal(signal.SIGTERM)
        return out

    cfg = train_config(tmp / "run", tmp / "data", 6, train__eval_batches=0,
                       checkpoint__save_interval=0, checkpoint__async_save=False)  # fmt: skip
    loop.train_step = step_then_signal
    calls, restore = _count_flag_reductions()
    try:
        result = loop.train(cfg)
    finally:
        restore()
        loop.train_step = real
    newest = ckpt.newest_intact(tmp / "run" / "checkpoints")
    return {
        "rank": rank,
        "last_step": result.last_step,
        "preempted": result.preempted,
        "checkpoint": result.checkpoint,
        "newest": newest.name if newest else None,
        "blocking": calls.count(False),
    }


@pytest.mark.slow  # two spawned ranks training the tiny model a few steps: ~60-90 s
def test_sigterm_on_one_rank_stops_every_dp_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    results = run_distributed(_train_with_sigterm, 2, str(tmp_path), timeout=600)
    steps = {r["last_step"] for r in results}
    assert len(steps) == 1, results  # every rank stopped after the same step
    (reached,) = steps
    assert 2 <= reached < 6, results
    for r in results:
        assert r["preempted"], r
        assert r["checkpoint"].endswith(f"step_{reached:08d}"), r
        assert r["newest"] == f"step_{reached:08d}", r
        assert r["blocking"] == 0, r
