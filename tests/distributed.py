"""Run a test body in N spawned processes on the gloo backend, like torchrun would.

`run_distributed(fn, world_size, *args)` starts `world_size` processes with torchrun's
environment variables, calls `fn(*args)` in each, and returns the per-rank results. A failure on
any rank raises with that rank's traceback; a rank that does not finish within `timeout` seconds
(a hung collective) fails the test and every process is killed, so nothing hangs. Process start
costs ~6-10 s of imports: put many checks in one `fn`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, args, rank, world_size, port, threads, results) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS=str(threads),
    )
    try:
        import torch

        torch.set_num_threads(threads)
        value = fn(*args)
        # Plain pickle bytes: tensors sent as-is would travel through shared memory that
        # disappears when this process exits before the parent has read them.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from fgclip_mega.parallel import destroy_parallel

            destroy_parallel()
        except BaseException:  # noqa: BLE001
            pass


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0
) -> list[Any]:
    """`fn` must be a module-level function (it is pickled into spawned processes)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    threads = max(1, (os.cpu_count() or 2) // world_size)
    procs = [
        ctx.Process(target=_worker, args=(fn, args, r, world_size, port, threads, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outcome: dict[int, tuple[str, Any]] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                # A rank that died without reporting (segfault, OOM kill) fails fast.
                dead = [
                    r
                    for r, p in enumerate(procs)
                    if r not in outcome and p.exitcode not in (None, 0)
                ]
                if dead and results.empty():
                    time.sleep(0.5)
                    if results.empty():
                        for r in dead:
                            outcome[r] = ("error", f"exited with code {procs[r].exitcode}")
                continue
            outcome[rank] = (status, value)
            if status == "error":
                break  # the other ranks may now be stuck in a collective
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcome) == world_size else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: v for r, (s, v) in outcome.items() if s == "error"}
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
        raise AssertionError(f"distributed test failed on rank(s) {sorted(errors)}:\n{text}")
    missing = sorted(set(range(world_size)) - set(outcome))
    if missing:
        raise AssertionError(f"rank(s) {missing} did not finish within {timeout:.0f} s (hang?)")
    return [pickle.loads(outcome[r][1]) for r in range(world_size)]
