"""Optional torch.profiler trace of a few training steps (Chrome trace JSON + a table)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


@contextlib.contextmanager
def maybe_torch_profiler(
    output_dir: Path | None,
    device: torch.device | str = "cpu",
    wait: int = 1,
    warmup: int = 1,
    active: int = 3,
):
    """Yields a `step()` callable; profiles `active` steps after `wait + warmup` when enabled."""
    cuda = torch.device(device).type == "cuda"
    if output_dir is None:
        yield lambda: None
        return
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def on_trace_ready(prof):
        prof.export_chrome_trace(str(output_dir / f"trace_step{prof.step_num}.json"))
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        (output_dir / "top_ops.txt").write_text(
            prof.key_averages().table(sort_by=sort, row_limit=40)
        )

    with torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(wait=wait, warmup=warmup, active=active, repeat=1),
        on_trace_ready=on_trace_ready,
        record_shapes=True,
    ) as prof:
        yield prof.step
