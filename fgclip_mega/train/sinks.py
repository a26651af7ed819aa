"""Metric sinks beside metrics.jsonl: TensorBoard and Weights & Biases (`train.loggers`).

Each sink receives exactly the records written to metrics.jsonl (rank 0 only), the optimizer step
as the x-axis: a training record's values as `train/<key>` (losses by term, temperatures, lr,
grad norm, samples/s, TFLOP/s, MFU, phase times `ms_*`, checkpoint stalls), an evaluation's as
`eval/<key>`. A sink whose package is absent or that raises is dropped with one warning; the run
goes on (metrics.jsonl, which resume and the plots read, is written by MetricsLogger itself).

Resume continues the same TensorBoard directory and the same W&B run without duplicate steps:
the steps after the checkpoint are trained and logged again, so TensorBoard purges its events
from `resume_step + 1` on (`purge_step`) and W&B rewinds the run to `resume_step`
(`resume_from="<id>?_step=<resume_step>"`, recorded in offline runs too and applied by
`wandb sync`). The W&B run id lives in `<output_dir>/wandb_run.json`.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("fgclip_mega.train")

TB_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run.json"


def sink_values(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record as sink scalars: `{kind}/{key}` for every finite number (nested
    dicts joined with '.'); `step` is the x-axis, not a value."""
    out: dict[str, float] = {}

    def add(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                add(f"{prefix}{key}.", value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    out[f"{kind}/{prefix}{key}"] = float(value)

    add("", {k: v for k, v in values.items() if k != "step"})
    return out


class TensorBoardSink:
    name = "tensorboard"

    def __init__(self, output_dir: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(output_dir) / TB_DIR
        existing = self.dir.is_dir() and any(self.dir.iterdir())
        # Events at steps > resume_step belong to the abandoned continuation: hidden by readers.
        purge = resume_step + 1 if existing else None
        self.writer = SummaryWriter(str(self.dir), purge_step=purge, flush_secs=30)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        # A killed run keeps everything logged so far (the writer buffers otherwise).
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    name = "wandb"

    def __init__(
        self, output_dir: Path, resume_step: int, last_logged: int, project: str, config: dict
    ):
        import wandb

        output_dir = Path(output_dir)
        id_file = output_dir / WANDB_ID_FILE
        run_id = None
        if id_file.is_file():
            run_id = json.loads(id_file.read_text()).get("id")
        kwargs: dict[str, Any] = dict(
            project=project, dir=str(output_dir), name=output_dir.name, config=config
        )
        if run_id and last_logged > resume_step:
            # Steps past the checkpoint were logged before: rewind the run to the checkpoint
            # (W&B keeps history steps increasing; these steps are about to be logged again).
            kwargs["resume_from"] = f"{run_id}?_step={resume_step}"
        else:
            run_id = run_id or uuid.uuid4().hex[:8]  # W&B's id shape: 8 of [0-9a-z]
            kwargs.update(id=run_id, resume="allow")
        id_file.write_text(json.dumps({"id": run_id}) + "\n")
        if wandb.run is not None:  # left open by a run in this process that raised
            wandb.run.finish(exit_code=1)
        self.skip_through = 0  # steps W&B already holds and cannot take again
        try:
            self.run = wandb.init(**kwargs)
        except Exception as e:  # noqa: BLE001 - e.g. a server without run rewind
            if "resume_from" not in kwargs:
                raise
            log.warning(
                "W&B could not rewind run %s to step %d (%s: %s): continuing it instead; its "
                "steps %d-%d keep the values logged before the resume",
                run_id, resume_step, type(e).__name__, e, resume_step + 1, last_logged,
            )  # fmt: skip
            del kwargs["resume_from"]
            self.run = wandb.init(**kwargs, id=run_id, resume="allow")
            self.skip_through = last_logged
        log.info("W&B run %s (%s)", self.run.id, "offline" if self.run.offline else "online")

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.skip_through:  # W&B refuses a step below its last one (with a warning)
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """The configured sinks behind one guard: a sink that fails is reported once and dropped."""

    def __init__(self, sinks: list):
        self.sinks = list(sinks)
        if self.sinks:  # a run that raises never reaches MetricsLogger.close()
            atexit.register(self.close)

    def log(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self.sinks:
            return
        scalars = sink_values(kind, values)
        for sink in list(self.sinks):
            self._guard(sink, "log", lambda s=sink: s.log(step, scalars))

    def close(self) -> None:
        for sink in list(self.sinks):
            self._guard(sink, "close", sink.close)
        self.sinks = []

    def _guard(self, sink, what: str, call) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - a metric sink never stops training
            self.sinks.remove(sink)
            log.warning(
                "metric sink %s failed in %s (%s: %s): dropped; metrics.jsonl goes on",
                sink.name, what, type(e).__name__, e,
            )  # fmt: skip


def open_sinks(
    names: list[str],
    output_dir: Path,
    resume_step: int,
    last_logged: int,
    project: str = "fgclip_mega",
    config: dict | None = None,
) -> Sinks:
    """The sinks of `train.loggers` other than jsonl (always written by MetricsLogger).
    `last_logged`: the highest step metrics.jsonl held before this run truncated it."""
    opened = []
    for name in names:
        try:
            if name == "tensorboard":
                opened.append(TensorBoardSink(output_dir, resume_step))
            elif name == "wandb":
                opened.append(
                    WandbSink(output_dir, resume_step, last_logged, project, config or {})
                )
        except Exception as e:  # noqa: BLE001 - an absent package or a failed start
            hint = "" if not isinstance(e, ImportError) else f" (pip install {name})"
            log.warning(
                "metric sink %s unavailable (%s: %s)%s: training goes on without it",
                name, type(e).__name__, e, hint,
            )  # fmt: skip
    return Sinks(opened)
