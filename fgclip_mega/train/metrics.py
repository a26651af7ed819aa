"""Training log lines with rate, TFLOP/s, MFU and ETA, a JSONL metrics file, and a PNG of the loss
curves."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from fgclip_mega.train.sinks import Sinks, open_sinks

log = logging.getLogger("fgclip_mega.train")


class Throughput:
    """Model FLOPs per sample of the logged step's actual shapes (trimmed texts, valid boxes),
    and the peak FLOP/s of one device (the GPU's table value, or a measured CPU matmul rate)."""

    def __init__(self, run):
        from fgclip_mega.profiling import device_peak_flops

        self.cfg, self.dp_size = run.cfg, run.state.dp_size
        self.world_size = run.state.world_size
        self.peak = device_peak_flops(run.runtime.device, run.runtime.compute_dtype)

    def of(self, batch) -> dict[str, float]:
        from fgclip_mega.profiling import training_flops

        regional = self.cfg.train.stage == "regional"
        # FG-CLIP 2: the batch's own patch budget (NaFlexBatch pixels (B, N, 3 p^2))
        naflex = self.cfg.model.family == "fgclip2"
        report = training_flops(
            self.cfg,
            batch_size=len(batch),
            dp_size=self.dp_size,
            long_len=batch.long_tokens.shape[1],
            short_len=batch.short_tokens.shape[1],
            boxes=batch.region_rois.shape[0] if regional else None,
            hard_boxes=batch.hard_rows.shape[0] if regional else None,
            patches=batch.pixels.shape[1] if naflex else None,
        )
        return {
            "model_flops_per_sample": report.model_per_sample,
            "hardware_flops_per_sample": report.hardware_per_sample,
            "world_size": self.world_size,
            "peak_flops": self.peak,
        }


class MetricsLogger:
    """metrics.jsonl (always) and the sinks of `loggers` (TensorBoard, W&B: train/sinks.py), all
    written by the rank that is `enabled` (rank 0)."""

    def __init__(
        self,
        output_dir: Path,
        total_steps: int,
        enabled: bool,
        resume_step: int = 0,
        loggers: list[str] | tuple[str, ...] = (),
        wandb_project: str = "fgclip_mega",
        run_config: dict | None = None,
    ):
        self.total_steps = total_steps
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self.records: list[dict] = []
        self.evals: list[dict] = []
        self._t0 = time.perf_counter()
        self._last_t = self._t0
        self._last_samples = 0
        self._samples = 0
        self.last_logged = 0  # the highest step in metrics.jsonl before the resume cut it
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_records_after(resume_step)
        self.sinks = Sinks([])
        if enabled and any(name != "jsonl" for name in loggers):
            self.sinks = open_sinks(
                list(loggers), self.path.parent, resume_step, self.last_logged, wandb_project,
                run_config,
            )  # fmt: skip

    def _drop_records_after(self, step: int) -> None:
        # After a resume the steps past the checkpoint are trained again: keep the file in order.
        # Every rank reads the records (a finished run reports them); rank 0 rewrites the file.
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if line.strip():
                    at = json.loads(line)["step"]
                    self.last_logged = max(self.last_logged, at)
                    if at <= step:
                        kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                log.warning("%s: dropping an unreadable line (an interrupted write)", self.path)
        records = [json.loads(line) for line in kept]
        self.records = [r for r in records if "eval" not in r]
        self.evals = [{"step": r["step"], **r["eval"]} for r in records if "eval" in r]
        if self.enabled:
            self.path.write_text("".join(line + "\n" for line in kept))

    def last_record(self) -> dict:
        return dict(self.records[-1]) if self.records else {}

    def last_eval(self) -> dict:
        return dict(self.evals[-1]) if self.evals else {}

    def has_eval(self, step: int) -> bool:
        return any(e["step"] == step for e in self.evals)

    def add_samples(self, n: int) -> None:
        self._samples += n

    def log(
        self,
        step: int,
        values: dict[str, float],
        first_step: int = 0,
        flops: dict[str, float] | None = None,
        phases: dict[str, float] | None = None,
    ) -> None:
        """`flops` from Throughput.of (adds TFLOP/s per device, MFU and HFU); `phases`: mean ms
        per step of each phase since the last log line."""
        if not self.enabled:
            return
        now = time.perf_counter()
        rate = (self._samples - self._last_samples) / max(now - self._last_t, 1e-9)
        done = step - first_step
        per_step = (now - self._t0) / max(done, 1)
        eta = per_step * (self.total_steps - step)
        record = {"step": step, **values, "samples_per_s": rate, "elapsed_s": now - self._t0}
        if flops:
            # Global samples/s x FLOPs per sample, spread over every device of the job.
            per_device = rate * flops["model_flops_per_sample"] / flops["world_size"]
            record["tflops_per_device"] = per_device / 1e12
            record["mfu"] = per_device / flops["peak_flops"]
            hardware = rate * flops["hardware_flops_per_sample"] / flops["world_size"]
            record["hfu"] = hardware / flops["peak_flops"]
        record.update(phases or {})
        self.records.append(record)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.sinks.log(step, "train", record)
        parts = " ".join(f"{k}={v:.4f}" for k, v in values.items() if k != "lr")
        speed = f"{rate:.1f} samples/s"
        if flops:
            speed += f", {record['tflops_per_device']:.3g} TFLOP/s/device, MFU {record['mfu']:.1%}"
        log.info(
            "step %d/%d %s lr=%.2e | %s | %.2f s/step | ETA %s",
            step,
            self.total_steps,
            parts,
            values.get("lr", 0.0),
            speed,
            per_step,
            time.strftime("%H:%M:%S", time.gmtime(max(eta, 0))),
        )
        self._last_t, self._last_samples = now, self._samples

    def log_eval(self, step: int, values: dict[str, float]) -> None:
        self.evals.append({"step": step, **values})
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps({"step": step, "eval": values}) + "\n")
        self.sinks.log(step, "eval", values)
        log.info("eval at step %d: %s", step, " ".join(f"{k}={v:.3f}" for k, v in values.items()))

    def close(self) -> None:
        """Finishes the sinks (the W&B run, the TensorBoard writer); metrics.jsonl is closed."""
        self.sinks.close()

    def plot(self, path: Path | None = None) -> Path | None:
        if not self.enabled or not self.records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path or self.path.with_name("loss.png"))
        keys = [k for k in ("loss", "long", "short", "region", "hard") if k in self.records[0]]
        steps = [r["step"] for r in self.records]
        fig, (ax, ax_rate) = plt.subplots(1, 2, figsize=(11, 4))
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in self.records], label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("FG-CLIP training losses")
        ax.legend()
        ax_rate.plot(steps, [r["samples_per_s"] for r in self.records])
        ax_rate.set_xlabel("step")
        ax_rate.set_ylabel("samples/s")
        ax_rate.set_title("throughput")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
