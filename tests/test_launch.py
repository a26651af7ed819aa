"""Multi-node launch, tested on one machine: two torchrun launchers (one per "node") meeting at a
c10d rendezvous train like one launcher with both processes (DP=2, bitwise) and like one process
(TP=2 vs TP=1, within 1e-4)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
PARTS = ("long", "short", "region", "hard", "loss")
TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(out: Path, *extra: str) -> list[str]:
    return ["--preset", "tiny", "model.vision.layers=1", "model.text.layers=1",
            "data.micro_batch_size=4", "data.synthetic_num_samples=24",
            f"data.synthetic_dir={out.parent / 'data'}", f"train.output_dir={out}",
            "train.steps=3", "train.log_interval=1", "train.eval_batches=0",
            "optim.warmup_steps=1", *extra]  # fmt: skip


def _run_all(commands: list[list[str]]) -> list[tuple[int, str, str]]:
    """Runs the commands at once (each in its own session); kills every one of them and their
    workers when any exceeds the timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for cmd in commands
    ]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
            results.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return results


def _two_nodes(out: Path, *extra: str) -> list[tuple[int, str, str]]:
    endpoint = f"127.0.0.1:{_free_port()}"
    return _run_all([
        [TORCHRUN, "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", out.name,
         "--rdzv-conf", f"is_host={int(node == 0)}", "--max-restarts", "0",
         "-m", "fgclip_mega.train", *_overrides(out, *extra)]
        for node in (0, 1)
    ])  # fmt: skip


def _summary_and_losses(results, out: Path) -> tuple[dict, list[dict]]:
    """The summary JSON line (printed by global rank 0, on either launcher) and metrics.jsonl."""
    summaries = []
    for rc, stdout, stderr in results:
        assert rc == 0, stderr[-4000:]
        summaries += [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1, summaries
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    return summaries[0], [r for r in records if "eval" not in r]


@pytest.mark.slow
def test_two_launchers_train_like_one(tmp_path):
    multi = _two_nodes(tmp_path / "multi")
    summary, losses = _summary_and_losses(multi, tmp_path / "multi")
    one = _run_all([[TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "fgclip_mega.train",
                     *_overrides(tmp_path / "one")]])  # fmt: skip
    ref_summary, ref_losses = _summary_and_losses(one, tmp_path / "one")
    assert summary["steps"] == ref_summary["steps"] == 3
    assert [r["step"] for r in losses] == [1, 2, 3]
    for got, want in zip(losses, ref_losses, strict=True):
        assert {k: got[k] for k in PARTS} == {k: want[k] for k in PARTS}, got["step"]
    assert {k: summary["final"][k] for k in PARTS} == {k: ref_summary["final"][k] for k in PARTS}
    assert losses[-1]["loss"] != losses[0]["loss"]
    # Both launchers joined one world of 2: the log says so.
    assert "world 2 = TP 1 x DP 2" in "".join(err for _, _, err in multi)


@pytest.mark.slow
def test_two_launchers_tensor_parallel_match_one_process(tmp_path):
    multi = _two_nodes(tmp_path / "multi", "parallel.tensor_parallel_size=2")
    summary, losses = _summary_and_losses(multi, tmp_path / "multi")
    one = _run_all([[sys.executable, "-m", "fgclip_mega.train", *_overrides(tmp_path / "one")]])
    ref_summary, ref_losses = _summary_and_losses(one, tmp_path / "one")
    assert "world 2 = TP 2 x DP 1" in "".join(err for _, _, err in multi)
    for got, want in zip(losses, ref_losses, strict=True):
        for part in PARTS:
            assert got[part] == pytest.approx(want[part], rel=1e-4, abs=1e-5), (got["step"], part)
    for part in PARTS:
        assert summary["final"][part] == pytest.approx(ref_summary["final"][part], rel=1e-4)
