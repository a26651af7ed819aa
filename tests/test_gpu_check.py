"""run/gpu_check.py's plan and CPU dry run, and run/gpu_train_step.py's case options, on a CPU.

What needs a GPU (the parts themselves) runs only on a lent GPU machine; here: the plan fits 540
s, the loss tests are pinned to one tile, the other GPU tests are found by their marker (not by
importing the whole suite), every part writes one JSON object with pass and seconds, a part's
CPU stand-in runs, the training options turn into the right config, and the sync-debug wrapper
puts whole steps (after the first) under "error" with the gradient-norm read allowed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / f"run/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_plan_pins_the_loss_tile_and_finds_gpu_tests_by_marker():
    gc = _load("gpu_check")
    parts = {p.name: p for p in gc.parts()}
    assert sum(p.budget_s for p in parts.values()) <= gc.DEADLINE_S <= 540
    assert parts["pytest_losses"].env["FGCLIP_LOSS_TILE"] == "64,64,4,3"
    for name in ("train_features", "train_presets"):
        assert parts[name].env["FGCLIP_LOSS_TILE"] == "64,64,4,3"
    other = [a for a in parts["pytest_other"].cmd if a.startswith("tests")]
    assert other and "tests" not in other  # files, never the whole directory
    for f in other:
        assert "pytest.mark.gpu" in (ROOT / f).read_text()
        assert f not in gc.ROI_TESTS + gc.LOSS_TESTS + gc.ATTENTION_TESTS + gc.DALI_TESTS
    # Every GPU-marked file is run by some part.
    covered = set(gc.ROI_TESTS + gc.LOSS_TESTS + gc.ATTENTION_TESTS + gc.DALI_TESTS + other)
    marked = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.gpu" in p.read_text()
    }
    assert marked <= covered, marked - covered
    features = " ".join(parts["train_features"].cmd + parts["train_features"].cpu_cmd)
    assert "--cpu" in parts["train_features"].cpu_cmd and "syncdebug" in features


def test_cpu_dry_run_runs_a_stand_in_and_writes_pass_and_seconds(tmp_path):
    env = dict(os.environ)
    env.pop("OUT", None)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run/gpu_check.py"),
            "--cpu-dry-run",
            "--out",
            str(tmp_path),
            "--only",
            "bench_loss",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (jsonl,) = tmp_path.glob("gpu_check_*-cpu-dry-run.jsonl")
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    plan, summary = lines[0], lines[-1]
    assert plan["cpu_dry_run"] is True and plan["cuda"] is False and summary["failed"] == []
    parts = {x["part"]: x for x in lines[1:-1] if "record" not in x}
    assert set(parts) == set(plan["budgets"])
    assert all("pass" in p and "seconds" in p for p in parts.values())
    bench = parts["bench_loss"]
    assert bench["cpu_stand_in"] and bench["pass"] is True and bench["seconds"] > 0
    assert any(x.get("part") == "bench_loss" and "record" in x for x in lines)  # its JSON lines
    assert parts["train_presets"]["pass"] is None  # skipped: not in --only


def test_train_cases_turn_into_config_overrides():
    ts = _load("gpu_train_step")
    case = ts.Case.parse("tiny:regional:distopt+ckpt+siglip+eval")
    o = case.overrides()
    assert "train.stage=regional" in o and "train.eval_batches=1" in o
    assert "parallel.use_distributed_optimizer=true" in o
    assert "parallel.overlap_grad_reduce=true" in o
    assert "parallel.activation_checkpointing=true" in o and "loss.kind=sigmoid" in o
    assert "train.eval_batches=0" in ts.Case.parse("tiny:global").overrides()
    for bad in ("tiny:stage3", "tiny:global:fast", ":global"):
        with pytest.raises(SystemExit, match="bad case"):
            ts.Case.parse(bad)
    # Every case the GPU parts run parses.
    for text in ts.FEATURE_CASES + ts.PRESET_CASES:
        ts.Case.parse(text)


def test_sync_debug_covers_whole_steps_and_allows_the_grad_norm(monkeypatch):
    # The CUDA calls are recorded instead of made: the wrapper's logic, not CUDA's.
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.optimizer.optimizer as mopt

    from fgclip_mega.train import loop

    ts = _load("gpu_train_step")
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: modes.append(m))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: modes.append("sync"))
    monkeypatch.setattr(clip_grads, "get_grad_norm_fp32", lambda *a, **k: modes.append("norm"))
    monkeypatch.setattr(mopt, "get_grad_norm_fp32", clip_grads.get_grad_norm_fp32)

    def fake_step(run, batch, step):
        modes.append(f"step{step}")
        mopt.get_grad_norm_fp32([])  # what megatron's optimizer calls inside the step
        return step

    monkeypatch.setattr(loop, "train_step", fake_step)
    sync = ts.SyncDebug(first_step=2)
    with sync.installed():
        for step in (1, 2, 3):
            assert loop.train_step(None, None, step) == step
    assert loop.train_step is fake_step  # restored
    assert modes == [
        "step1", "norm",  # the first step (autotuning, allocations) runs unchecked
        "sync", "error", "step2", "default", "norm", "error", "default",
        "sync", "error", "step3", "default", "norm", "error", "default",
    ]  # fmt: skip
    assert sync.steps == [2, 3] and sync.allowed_per_step == [1, 1]
