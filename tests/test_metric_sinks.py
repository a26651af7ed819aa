"""TensorBoard and W&B (offline) sinks hold exactly what metrics.jsonl holds, step for step, also
across a resume from an earlier checkpoint and across a kill -9 and resume of the training
command; an absent package or a raising sink is one warning and the run goes on.

The event files are read back with tensorboard's own EventAccumulator and the offline W&B run
files with wandb's own reader (`wandb leet inspect --json`), as `wandb sync` would replay them:
the runs of one id in start order, each rewound to its branch point."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fgclip_mega.train.metrics import MetricsLogger
from fgclip_mega.train.sinks import TB_DIR, WANDB_ID_FILE, sink_values

ROOT = Path(__file__).resolve().parents[1]
WANDB = Path(sys.executable).with_name("wandb")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")


# ----------------------------------------------------------------------------- readers


def expected(out: Path) -> dict[int, dict[str, float]]:
    """metrics.jsonl as {step: {tag: value}}, through the one record -> scalars rule."""
    rows: dict[int, dict[str, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        kind, values = ("eval", r["eval"]) if "eval" in r else ("train", r)
        rows.setdefault(r["step"], {}).update(sink_values(kind, values))
    return rows


def tensorboard_rows(out: Path) -> dict[int, dict[str, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / TB_DIR), size_guidance={"scalars": 0})  # 0 = keep all
    acc.Reload()
    rows: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            row = rows.setdefault(event.step, {})
            assert tag not in row, f"duplicate {tag} at step {event.step}"
            row[tag] = event.value
    return rows


def wandb_records(run_dir: Path) -> list[dict]:
    proc = subprocess.run(
        [str(WANDB), "leet", "inspect", "--json", str(run_dir)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def wandb_rows(out: Path) -> tuple[dict[int, dict[str, float]], list[dict]]:
    """History of the run id in wandb_run.json, replayed over its offline run dirs in start
    order (each rewound to its branch point); also each dir's run record."""
    run_id = json.loads((out / WANDB_ID_FILE).read_text())["id"]
    # offline-run-<YYYYmmdd_HHMMSS>-<id>, and -<id>-<n> when a resume starts within the same
    # second as the previous attempt (wandb's suffix): in start order.
    pattern = re.compile(rf"offline-run-(\d{{8}}_\d{{6}})-{run_id}(?:-(\d+))?")
    keyed = []
    for d in (out / "wandb").glob("offline-run-*"):
        if m := pattern.fullmatch(d.name):
            keyed.append(((m.group(1), int(m.group(2) or 0)), d))
    dirs = [d for _, d in sorted(keyed)]
    assert dirs, sorted(p.name for p in (out / "wandb").iterdir())
    rows: dict[int, dict[str, float]] = {}
    runs = []
    for d in dirs:
        records = wandb_records(d)
        found = [r["run"] for r in records if r["type"] == "run"]
        if not found:  # a run killed before W&B wrote anything but the header
            continue
        (run,) = found
        runs.append(run)
        assert run["run_id"] == run_id
        if "branch_point" in run:  # resume_from: history after the branch point is replaced
            cut = int(run["branch_point"]["value"])
            rows = {s: v for s, v in rows.items() if s <= cut}
        for r in records:
            if r["type"] != "history":
                continue
            step = int(r["history"]["step"]["num"])
            item = {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
            row = rows.setdefault(step, {})
            assert not set(item) & set(row), f"duplicate {sorted(set(item) & set(row))} at {step}"
            row.update(item)
    return rows, runs


def assert_same(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: steps {sorted(got)} != {sorted(want)}"
    for step, values in want.items():
        assert sorted(got[step]) == sorted(values), (what, step)
        for tag, value in values.items():
            # TensorBoard stores float32 scalars; W&B keeps the float64.
            assert got[step][tag] == pytest.approx(value, rel=1e-6, abs=1e-12), (what, step, tag)


# ----------------------------------------------------------------------------- logger level


def _log_steps(metrics: MetricsLogger, steps, eval_at=()):
    for step in steps:
        metrics.add_samples(8)
        values = {"long": 1.0 / step, "short": 2.0 / step, "loss": 3.0 / step,
                  "lr": 1e-3 * step, "grad_norm": 0.5 + step, "logit_scale": 4.6,
                  "checkpoint_stall_s": 0.01}  # fmt: skip
        flops = {"model_flops_per_sample": 1e9, "hardware_flops_per_sample": 1.3e9,
                 "world_size": 2, "peak_flops": 2e11}  # fmt: skip
        metrics.log(step, values, 0, flops, {"ms_data": 1.5 * step, "ms_forward": 10.0})
        if step in eval_at:
            metrics.log_eval(step, {"i2t_long_r1": 0.25 * step, "pairwise_acc.colour": 0.5})


def test_sinks_match_jsonl_across_a_resume_from_an_earlier_checkpoint(tmp_path):
    out = tmp_path / "run"
    loggers = ["jsonl", "tensorboard", "wandb"]
    first = MetricsLogger(out, 6, enabled=True, loggers=loggers, run_config={"a": 1})
    assert [s.name for s in first.sinks.sinks] == ["tensorboard", "wandb"]
    _log_steps(first, range(1, 6), eval_at=(2, 4))
    first.close()
    # Resumed from the step-2 checkpoint: steps 3-5 are trained and logged again.
    second = MetricsLogger(out, 6, enabled=True, resume_step=2, loggers=loggers)
    assert second.last_logged == 5
    _log_steps(second, range(3, 7), eval_at=(4, 6))
    second.close()

    want = expected(out)
    assert sorted(want) == [1, 2, 3, 4, 5, 6]
    assert {"train/mfu", "train/tflops_per_device", "train/samples_per_s", "train/ms_data",
            "train/checkpoint_stall_s", "train/lr", "train/grad_norm", "train/logit_scale",
            "eval/i2t_long_r1", "eval/pairwise_acc.colour"} <= set(want[4])  # fmt: skip
    assert_same(tensorboard_rows(out), want, "tensorboard")
    rows, runs = wandb_rows(out)
    assert_same(rows, want, "wandb")
    assert len(runs) == 2 and runs[1]["branch_point"]["value"] == 2
    # The timing values of the retrained steps are the second run's, in both sinks.
    assert tensorboard_rows(out)[3]["train/elapsed_s"] == pytest.approx(
        want[3]["train/elapsed_s"], rel=1e-6
    )


def test_a_resume_at_the_last_logged_step_continues_the_wandb_run_without_rewind(tmp_path):
    out = tmp_path / "run"
    first = MetricsLogger(out, 4, enabled=True, loggers=["wandb"])
    _log_steps(first, (1, 2))
    first.close()
    second = MetricsLogger(out, 4, enabled=True, resume_step=2, loggers=["wandb"])
    _log_steps(second, (3, 4))
    second.close()
    rows, runs = wandb_rows(out)
    assert_same(rows, expected(out), "wandb")
    assert [("branch_point" in r, r.get("resume")) for r in runs] == [(False, True), (False, True)]


def test_a_server_without_rewind_continues_the_run_without_duplicate_steps(
    tmp_path, monkeypatch, caplog
):
    import wandb

    real_init = wandb.init

    def no_rewind(**kwargs):
        if "resume_from" in kwargs:
            raise wandb.errors.CommError("rewind is not enabled for this entity")
        return real_init(**kwargs)

    out = tmp_path / "run"
    first = MetricsLogger(out, 6, enabled=True, loggers=["wandb"])
    _log_steps(first, range(1, 6))
    first.close()
    monkeypatch.setattr(wandb, "init", no_rewind)
    with caplog.at_level(logging.WARNING, logger="fgclip_mega.train"):
        second = MetricsLogger(out, 6, enabled=True, resume_step=2, loggers=["wandb"])
        _log_steps(second, range(3, 7))
        second.close()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "could not rewind" in warning and "steps 3-5 keep" in warning
    rows, runs = wandb_rows(out)
    assert [("branch_point" in r, r.get("resume")) for r in runs] == [(False, True), (False, True)]
    want = expected(out)
    assert sorted(rows) == sorted(want) == [1, 2, 3, 4, 5, 6]  # each step once
    # Steps 1-2 and 6 as metrics.jsonl; 3-5 keep the first attempt's values (same losses).
    assert_same({s: rows[s] for s in (1, 2, 6)}, {s: want[s] for s in (1, 2, 6)}, "wandb")
    for step in (3, 4, 5):
        assert rows[step]["train/loss"] == pytest.approx(want[step]["train/loss"])


class _Raising:
    name = "flaky"

    def __init__(self):
        self.calls = 0

    def log(self, step, scalars):
        self.calls += 1
        raise OSError("disk full")

    def close(self):
        raise AssertionError("a dropped sink is not closed")


def test_a_raising_sink_is_one_warning_and_an_absent_package_another(tmp_path, monkeypatch, caplog):
    from fgclip_mega.train import sinks

    flaky = _Raising()
    real_open = sinks.open_sinks

    def with_flaky(*args, **kwargs):
        opened = real_open(*args, **kwargs)
        opened.sinks.append(flaky)
        return opened

    monkeypatch.setattr("fgclip_mega.train.metrics.open_sinks", with_flaky)
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="fgclip_mega.train"):
        metrics = MetricsLogger(out, 4, enabled=True, loggers=["tensorboard", "wandb"])
        _log_steps(metrics, range(1, 5), eval_at=(4,))
        metrics.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2, warnings
    assert "wandb unavailable" in warnings[0] and "pip install wandb" in warnings[0]
    assert "flaky failed in log (OSError: disk full)" in warnings[1]
    assert flaky.calls == 1
    want = expected(out)
    assert sorted(want) == [1, 2, 3, 4]
    assert_same(tensorboard_rows(out), want, "tensorboard")  # the other sink went on


def test_only_the_enabled_rank_opens_sinks(tmp_path):
    metrics = MetricsLogger(tmp_path / "r1", 4, enabled=False, loggers=["tensorboard", "wandb"])
    _log_steps(metrics, (1, 2))
    metrics.close()
    assert metrics.sinks.sinks == [] and not (tmp_path / "r1").exists()


# ----------------------------------------------------------------------------- kill -9 + resume


def _cli(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "fgclip_mega.train", "--preset", "tiny",
            "model.vision.layers=1", "model.text.layers=1", "data.micro_batch_size=4",
            "data.synthetic_num_samples=24", f"data.synthetic_dir={out.parent / 'data'}",
            f"train.output_dir={out}", "train.log_interval=1", "train.eval_batches=2",
            "train.eval_interval=3", "checkpoint.save_interval=3",
            "checkpoint.async_save=false", "train.loggers=[jsonl,tensorboard,wandb]",
            *overrides]  # fmt: skip


def _steps_logged(log: list[str]) -> int:
    found = [re.search(r"step (\d+)/400", line) for line in log]
    return max((int(m.group(1)) for m in found if m), default=0)


@pytest.mark.slow
def test_training_killed_and_resumed_leaves_sinks_equal_to_jsonl(tmp_path):
    out = tmp_path / "run"
    # Not WANDB_SERVICE: this test process's own wandb-core (started by the tests above) would
    # serve the children too and keep the killed run's stream open ("run ID ... is in use").
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env.update(OMP_NUM_THREADS="2", WANDB_MODE="offline", WANDB_SILENT="true")
    proc = subprocess.Popen(_cli(out, "train.steps=400"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    log = []
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            log.append(line)
            if "step 5/400" in line:  # checkpoint at 3, steps 4-5 logged past it
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait()
    assert _steps_logged(log) == 5, "".join(log[-30:])
    # Complete checkpoints only (a kill during a save leaves a .partial one, never loaded).
    saved = sorted(
        int(p.name.split("_")[1])
        for p in (out / "checkpoints").glob("step_*")
        if p.name[5:].isdigit()
    )
    ckpt = saved[-1]
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) >= ckpt >= 3
    killed_tb = tensorboard_rows(out)
    assert max(steps) in killed_tb  # flushed before the kill

    last = ckpt + 4
    rerun = subprocess.run(_cli(out, f"train.steps={last}"), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=400)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and f"at step {ckpt}" in rerun.stderr
    assert "metric sink" not in rerun.stderr  # no sink failed or was missing
    # W&B's console capture is over before the command prints its summary line.
    assert json.loads(rerun.stdout.strip().splitlines()[-1])["steps"] == last
    want = expected(out)
    assert sorted(want) == list(range(1, last + 1))
    assert {"eval/i2t_long_r1", "train/loss"} <= set(want[3]) and "eval/i2t_long_r1" in want[last]
    assert_same(tensorboard_rows(out), want, "tensorboard")
    # W&B's offline writer (its own service process) buffers records and has no flush call: a
    # SIGKILL loses what it had not written yet (README). What the killed run's file does hold
    # must equal metrics.jsonl; everything the resumed run logged past its branch point is there.
    rows, runs = wandb_rows(out)
    resumed = [r for r in runs if "branch_point" in r]
    assert len(resumed) == 1 and resumed[0]["branch_point"]["value"] == ckpt
    assert set(range(ckpt + 1, last + 1)) <= set(rows)
    assert_same(rows, {s: v for s, v in want.items() if s in rows}, "wandb")


def test_loggers_config_takes_a_list_and_names_the_field_when_wrong():
    from fgclip_mega.config import ConfigError
    from fgclip_mega.presets import load_config

    assert load_config("tiny").train.loggers == ["jsonl"]
    for given, want in (("[jsonl,tensorboard]", ["jsonl", "tensorboard"]),
                        ("wandb,tensorboard", ["wandb", "tensorboard"]), ("[]", [])):  # fmt: skip
        assert load_config("tiny", None, [f"train.loggers={given}"]).train.loggers == want
    for given, message in (("[mlflow]", "train.loggers[0]: 'mlflow' is not one of"),
                           ("[wandb,wandb]", "train.loggers: repeats"),
                           ("3", "train.loggers: expected a list")):  # fmt: skip
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            load_config("tiny", None, [f"train.loggers={given}"])
