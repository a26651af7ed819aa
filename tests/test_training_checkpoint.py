"""Training checkpoints: corrupt/incomplete ones fall back (or fail naming the file), a kill -9
during a background save loses nothing, an extended schedule keeps learning after resume."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.builders import train_config as _cfg
from tests.distributed import run_distributed

STEP2, STEP4 = "step_00000002", "step_00000004"


def _flip_inside_tensor(ckpt: Path) -> None:
    """Flips one byte inside the stored bytes of a known tensor of model.pt."""
    model = torch.load(ckpt / "model.pt", weights_only=True)
    raw = model["vision.patch_embed.weight"].numpy().tobytes()
    data = bytearray((ckpt / "model.pt").read_bytes())
    at = data.find(raw)
    assert at > 0, "tensor bytes not found in model.pt"
    data[at + len(raw) // 2] ^= 0x10
    (ckpt / "model.pt").write_bytes(bytes(data))


def _corruptions() -> dict:
    def cut(name):
        return lambda d: (d / name).write_bytes((d / name).read_bytes()[:-37])

    def partial(d):
        d.rename(d.with_name(d.name + ".partial"))

    return {
        "truncated model.pt": (cut("model.pt"), "model.pt"),
        "empty optimizer.pt": (lambda d: (d / "optimizer.pt").write_bytes(b""), "optimizer.pt"),
        "cut meta.json": (cut("meta.json"), "meta.json"),
        "cut manifest": (cut("manifest.json"), "manifest.json"),
        "flipped tensor byte": (_flip_inside_tensor, "model.pt"),
        "missing train.pt": (lambda d: (d / "train.pt").unlink(), "train.pt"),
        ".partial only": (partial, None),
    }


def _single_process_checks(tmp: str) -> dict:
    from fgclip_mega.checkpoint import CheckpointError
    from fgclip_mega.checkpoint import training as ckpt
    from fgclip_mega.train.loop import train

    tmp = Path(tmp)
    data = tmp / "data"
    out: dict = {"api": {}, "fail": {}}
    full = train(_cfg(tmp / "full", data, 4, checkpoint__save_interval=2, train__eval_batches=0))
    out["full"] = full.losses

    # Every kind of damage to the newest checkpoint: found, named, skipped (or fatal).
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("fgclip_mega.checkpoint").addHandler(handler)
    for i, (kind, (damage, culprit)) in enumerate(_corruptions().items()):
        case = tmp / f"case{i}"
        shutil.copytree(tmp / "full", case)
        damage(case / "checkpoints" / STEP4)
        records.clear()
        found = ckpt.newest_intact(case / "checkpoints")
        warned = " ".join(r.getMessage() for r in records if r.levelno >= logging.WARNING)
        out["api"][kind] = (found.name, culprit is None or f"{STEP4}/{culprit}" in warned)
        if culprit is not None:
            try:
                ckpt.newest_intact(case / "checkpoints", on_corrupt="fail")
            except CheckpointError as e:
                out["fail"][kind] = f"{STEP4}/{culprit}" in str(e) and "on_corrupt" in str(e)
    # Nothing intact at all: an error, not a silent run from scratch.
    shutil.rmtree(tmp / "case0" / "checkpoints" / STEP2)
    try:
        ckpt.newest_intact(tmp / "case0" / "checkpoints")
    except CheckpointError as e:
        out["none_intact"] = str(e)

    # End to end: a bit flip in the newest checkpoint -> resume from step 2, exactly.
    resumed = train(_cfg(tmp / "case4", data, 4, train__eval_batches=0))
    out["fallback"] = (resumed.steps_done, resumed.losses)
    shutil.copytree(tmp / "full", tmp / "strict")
    _flip_inside_tensor(tmp / "strict" / "checkpoints" / STEP4)
    try:
        train(_cfg(tmp / "strict", data, 4, checkpoint__on_corrupt="fail", train__eval_batches=0))
    except CheckpointError as e:
        out["strict"] = str(e)

    # Issue 2: a 4-step run extended to 8 follows the 8-step schedule from step 5 (lr > 0).
    records_train: list[logging.LogRecord] = []
    th = logging.Handler()
    th.emit = records_train.append
    logging.getLogger("fgclip_mega.train").addHandler(th)
    ref8 = train(_cfg(tmp / "ref8", data, 8, train__eval_batches=0))
    shutil.copytree(tmp / "full", tmp / "ext")
    shutil.copytree(tmp / "full", tmp / "ext_lr")
    ext = train(_cfg(tmp / "ext", data, 8, train__eval_batches=0))
    records_train.clear()
    lr = 2 * _cfg(tmp, data, 1).optim.lr
    ext_lr = train(_cfg(tmp / "ext_lr", data, 8, optim__lr=lr, train__eval_batches=0))
    out["lr"] = {
        "ref8": [r["lr"] for r in ref8.losses],
        "ext": [(r["step"], r["lr"]) for r in ext.losses],
        "ext_lr": [(r["step"], r["lr"]) for r in ext_lr.losses],
        "logged": " ".join(r.getMessage() for r in records_train),
    }
    return out


@pytest.mark.slow
def test_corrupt_checkpoints_fall_back_and_extended_schedules_keep_learning(tmp_path):
    (res,) = run_distributed(_single_process_checks, 1, str(tmp_path), timeout=600)
    for kind, (found, named) in res["api"].items():
        assert found == STEP2, kind  # the newest intact one
        assert named, f"{kind}: the warning does not name the damaged file"
    assert res["fail"] and all(res["fail"].values()), res["fail"]
    assert len(res["fail"]) == len(res["api"]) - 1  # every named case fails with on_corrupt=fail
    assert "no intact checkpoint" in res["none_intact"]
    steps_done, losses = res["fallback"]
    assert steps_done == 2 and losses == res["full"][2:]  # resumed from step 2, bit for bit
    assert f"{STEP4}/model.pt" in res["strict"] and "sha256" in res["strict"]

    lr = res["lr"]
    assert [s for s, _ in lr["ext"]] == [5, 6, 7, 8]
    assert all(v > 0 for _, v in lr["ext"])
    assert [v for _, v in lr["ext"]] == lr["ref8"][4:]  # the new schedule, from step 5
    for (_, v2), ref in zip(lr["ext_lr"], lr["ref8"][4:], strict=True):
        assert v2 == pytest.approx(2 * ref, rel=1e-6)
    assert "optim.lr: 0.0005 -> 0.001" in lr["logged"]
    assert "train.steps: 4 -> 8" in lr["logged"]


# ----------------------------------------------------------------------------- kill -9 mid-save

_KILL_SCRIPT = r"""
import sys, time, types
import torch
sys.path.insert(0, {root!r})
from fgclip_mega.checkpoint import integrity, training as ckpt

class Group:
    def size(self): return 1
    def rank(self): return 0

class Opt:  # megatron FP32Optimizer's shape: the torch optimizer is `.optimizer`
    def __init__(self, params): self.optimizer = torch.optim.AdamW(params, lr=0.1)

class Stateful:
    def __init__(self, s): self.s = s
    def state_dict(self): return self.s

if __name__ == "__main__":
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 32)
    opt = Opt(model.parameters())
    model(torch.randn(4, 64)).sum().backward()
    opt.optimizer.step()
    state = types.SimpleNamespace(rank=0, world_size=1, tp_size=1, dp_size=1,
                                  tp_group=Group(), dp_group=Group())
    saver = ckpt.Checkpointer({out!r}, state, keep_last=2, async_save=True)
    args = (model, opt, Stateful({{"num_steps": 1}}), Stateful({{"position": 4}}), {{}})
    saver.save(1, *args)
    saver.wait()
    slow_write = integrity.write_file
    def crawl(*a, **k):
        time.sleep(1.0)
        return slow_write(*a, **k)
    integrity.write_file = crawl
    t0 = time.perf_counter()
    saver.save(2, *args)
    print("RETURNED", time.perf_counter() - t0, flush=True)
    time.sleep(60)
"""


@pytest.mark.slow
def test_kill_during_async_save_leaves_previous_checkpoint_intact(tmp_path):
    from fgclip_mega.checkpoint import integrity
    from fgclip_mega.checkpoint import training as ckpt

    out = tmp_path / "checkpoints"
    script = tmp_path / "save.py"
    root = str(Path(__file__).resolve().parents[1])
    script.write_text(_KILL_SCRIPT.format(root=root, out=str(out)))
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = proc.stdout.readline()  # save(2) returned while its files are being written
        assert line.startswith("RETURNED"), proc.stderr.read()
        stall = float(line.split()[1])
        deadline = time.monotonic() + 30
        partial = out / "step_00000002.partial"
        while not (partial / "model.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (partial / "model.pt").exists()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert stall < 1.0  # the loop did not wait for the (>= 4 s) write
    assert not (out / "step_00000002").exists() and partial.is_dir()
    assert ckpt.newest_intact(out).name == "step_00000001"
    integrity.verify(out / "step_00000001")
    manifest = integrity.read_manifest(out / "step_00000001")
    model = integrity.load_torch(out / "step_00000001", "model.pt", manifest)
    assert set(model) == {"weight", "bias"} and model["weight"].shape == (32, 64)
    meta = ckpt.read_meta(out / "step_00000001")
    assert meta["step"] == 1 and meta["checkpoint_stall_s"] >= 0
