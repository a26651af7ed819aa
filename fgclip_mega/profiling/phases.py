"""Wall-clock time per training-step phase (data, forward, backward, optimizer).

On CUDA the timer synchronises at phase boundaries when `sync=True`, so kernel time lands in the
phase that launched it (costs a little overlap; off by default in production runs).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self, sync: bool = False):
        self.sync = sync and torch.cuda.is_available()
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    @contextmanager
    def phase(self, name: str):
        if self.sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.totals[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def summary_ms(self) -> dict[str, float]:
        """Mean milliseconds per call of each phase."""
        return {k: 1e3 * v / max(self.counts[k], 1) for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()
