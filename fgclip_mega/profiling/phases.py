"""Time per training-step phase (data, forward, backward, optimizer).

On CPU: wall clock. On CUDA the compute phases are timed with CUDA events recorded on the
stream, read only when a summary is asked for, so timing adds no host sync; the data phase
stays wall clock (the time the step waits for its batch).
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

HOST_PHASES = ("data",)


class PhaseTimer:
    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self._pending: list[tuple[str, object, object]] = []

    @contextmanager
    def phase(self, name: str):
        if self.cuda and name not in HOST_PHASES:
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
                self.counts[name] += 1
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.totals[name] += time.perf_counter() - t0
            self.counts[name] += 1

    def _collect(self) -> None:
        for name, start, end in self._pending:
            end.synchronize()
            self.totals[name] += start.elapsed_time(end) / 1e3
        self._pending.clear()

    def summary_ms(self) -> dict[str, float]:
        """Mean milliseconds per call of each phase (reads the CUDA events: call at log time)."""
        self._collect()
        return {k: 1e3 * v / max(self.counts[k], 1) for k, v in self.totals.items()}

    def reset(self) -> None:
        self._pending.clear()
        self.totals.clear()
        self.counts.clear()
