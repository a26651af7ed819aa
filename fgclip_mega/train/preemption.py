"""Graceful preemption: SIGTERM/SIGUSR1 (what Slurm, Kubernetes and torchrun send) make the run
finish its current step, save a checkpoint and exit 0.

Ranks may get the signal at slightly different times, so after every step they agree with a
MAX all-reduce of one flag on a gloo group: a CPU collective, no device sync.
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
        if dist.is_initialized() and dist.get_world_size() > 1:
            default_is_gloo = dist.get_backend() == "gloo"
            self._group = dist.group.WORLD if default_is_gloo else dist.new_group(backend="gloo")

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    def should_stop(self) -> bool:
        """Collective over all ranks: True when any rank was signalled."""
        flag = torch.tensor([self.requested], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        if flag.item():
            self.requested = self.requested or int(flag.item())
            log.warning(
                "preemption signal %s: saving and stopping", signal.Signals(flag.item()).name
            )
            return True
        return False
