"""Graceful preemption: SIGTERM/SIGUSR1 (what Slurm, Kubernetes and torchrun send) make the run
finish its current step, save a checkpoint and exit 0.

Ranks may get the signal at slightly different times, so they agree with a MAX all-reduce of
one flag on a gloo group (a CPU collective, no device sync). It is started without waiting
after each step and read after the next one, so no rank waits for the others there (a blocking
reduction would hold every step's host until the slowest rank arrived, idling its GPU); every
rank reads the same reduced flag at the same step, so all stop together, one step after the
first signal. A world of one decides at once.
"""

from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger("fgclip_mega.train")
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self):
        self.requested = 0  # the signal number, 0 = none
        self._previous = {}
        self._group = None
        self._pending: tuple[dist.Work, torch.Tensor] | None = None  # the reduction in flight
        if dist.is_initialized() and dist.get_world_size() > 1:
            default_is_gloo = dist.get_backend() == "gloo"
            self._group = dist.group.WORLD if default_is_gloo else dist.new_group(backend="gloo")

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        self._collect()  # every rank started the same reductions: finish the last one
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    def _collect(self) -> int:
        """The reduced flag of the reduction in flight (0 when none)."""
        if self._pending is None:
            return 0
        work, flag = self._pending
        self._pending = None
        work.wait()  # started a step ago: normally done
        return int(flag.item())  # a CPU tensor: no device sync

    def should_stop(self) -> bool:
        """Collective over all ranks, called once per step by every rank: True on every rank at
        the same step when any rank was signalled (by the previous call, with several ranks)."""
        if self._group is None:
            signum = self.requested
        else:
            signum = self._collect()
            flag = torch.tensor([self.requested], dtype=torch.int64)
            work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
            self._pending = (work, flag)
        if signum:
            self.requested = self.requested or signum
            log.warning("preemption signal %s: saving and stopping", signal.Signals(signum).name)
            return True
        return False
