"""The training loop end to end on the layout-free checkpoints: resume is exact (bitwise), an
interrupted save is skipped, a finished run reruns as a no-op, TP=2 trains like TP=1, DP=2 logs
global values and resumes exactly (distributed optimizer), a DP-size change neither repeats nor
skips a sample, NaN gradients are named, bad settings fail before training, SIGTERM saves."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fgclip_mega.config import ConfigError
from tests.builders import run_at_once
from tests.builders import train_config as _cfg
from tests.distributed import run_distributed

PARTS = ("long", "short", "region", "hard", "loss")
ROOT = Path(__file__).resolve().parents[1]


def _params(out: Path, step: int) -> dict:
    from fgclip_mega.checkpoint import integrity

    path = Path(out) / "checkpoints" / f"step_{step:08d}"
    return integrity.load_torch(path, "model.pt", integrity.read_manifest(path))


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").open()]


def _recording_train(cfg, keep_process_groups: bool = False):
    """train(cfg) that also returns, per step, this rank's sample ids and local (pre-reduction)
    logged values."""
    import fgclip_mega.train.loop as loop

    seen: list[dict] = []
    real = loop.train_step

    def record(run, batch, step):
        out = real(run, batch, step)
        local = dict(zip(out.names, out.values.tolist(), strict=True))
        seen.append({"step": step, "ids": batch.sample_ids.tolist(), "local": local,
                     "num_parts": out.num_parts})  # fmt: skip
        return out

    loop.train_step = record
    try:
        result = loop.train(cfg, keep_process_groups=keep_process_groups)
    finally:
        loop.train_step = real
    return result, seen


def _next_layout() -> None:
    # Keeps torch.distributed (re-creating it on the same port races) and drops the TP x DP
    # groups, so the next run may choose another TP size.
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()


# ----------------------------------------------------------------------------- one process
# Each process group below takes 40-150 s on the shared 2-core CPU: every test using one is slow.


def _single_process_checks(tmp: str) -> dict:
    import fgclip_mega.train.loop as loop

    tmp = Path(tmp)
    data = tmp / "data"
    full_cfg = _cfg(tmp / "full", data, 4, checkpoint__save_interval=2,
                    train__profile_dir=str(tmp / "trace"))  # fmt: skip
    full = loop.train(full_cfg)
    out = {"full": full.losses, "full_evals": full.evals, "full_ckpt": full.checkpoint}
    out["full_params"], out["start_params"] = _params(tmp / "full", 4), _params(tmp / "full", 2)
    out["plot"] = (tmp / "full" / "loss.png").is_file()
    out["trace"] = sorted(p.name for p in (tmp / "trace").iterdir())
    out["full_records"] = _records(tmp / "full")

    # An interrupted run: the checkpoint of step 4 was being written when the process died.
    cut = tmp / "cut"
    shutil.copytree(tmp / "full", cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    partial = cut / "checkpoints" / "step_00000004.partial"
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"truncated")
    resumed = loop.train(_cfg(cut, data, 4, checkpoint__save_interval=2))
    out["resumed"] = (resumed.steps_done, resumed.losses, resumed.evals)
    out["resumed_params"] = _params(cut, 4)
    out["cut_records"] = _records(cut)
    out["partial_left"] = partial.exists()

    # Issue 11 (a): rerunning the finished run trains nothing, evaluates nothing new and reports
    # the saved final values.
    rerun = loop.train(full_cfg)
    out["rerun"] = {"steps_done": rerun.steps_done, "last_step": rerun.last_step,
                    "final": rerun.final, "evals": rerun.evals}  # fmt: skip
    out["rerun_records"] = _records(tmp / "full")

    # Issue 11 (c): a NaN gradient in one named parameter stops the run naming step and param.
    real_build = loop.build_training_run

    def poisoned(cfg, state):
        run = real_build(cfg, state)
        run.model.text.final_norm.weight.register_hook(lambda g: g * float("nan"))
        return run

    loop.build_training_run = poisoned
    try:
        loop.train(_cfg(tmp / "nan", data, 2, train__eval_batches=0))
        out["nan"] = "no error"
    except FloatingPointError as e:
        out["nan"] = str(e)
    finally:
        loop.build_training_run = real_build
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train1")
    (res,) = run_distributed(_single_process_checks, 1, str(tmp), timeout=600)
    return res


@pytest.mark.slow
def test_resume_is_exact_and_an_interrupted_save_is_skipped(single):
    steps_done, losses, evals = single["resumed"]
    assert steps_done == 2  # resumed from step 2: the .partial step 4 was never loaded
    assert losses == single["full"][2:]  # same losses, bit for bit
    full, resumed = single["full_params"], single["resumed_params"]
    assert set(full) == set(resumed) and len(full) > 10
    for name, value in full.items():
        assert torch.equal(value, resumed[name]), name
    moved = [n for n, v in full.items() if not torch.equal(v, single["start_params"][n])]
    assert len(moved) > 10  # the last two steps really trained
    assert not single["partial_left"]  # the next save cleared the leftover
    for part in PARTS:
        assert all(torch.isfinite(torch.tensor(s[part])) for s in single["full"]), part


@pytest.mark.slow
def test_metrics_are_deduplicated_on_resume_and_evaluated_once(single):
    def steps(records):
        return [r["step"] for r in records if "eval" not in r]

    assert steps(single["full_records"]) == [1, 2, 3, 4] and single["plot"]
    # The resumed run retrained steps 3-4 and re-evaluated at 4: replaced, not duplicated.
    assert steps(single["cut_records"]) == [1, 2, 3, 4]
    (final_eval,) = [r for r in single["full_records"] if "eval" in r]
    assert final_eval["step"] == 4
    for name in ("i2t_long_r1", "t2i_short_r1", "region_r1", "hard_neg_acc"):
        assert 0.0 <= final_eval["eval"][name] <= 1.0, name
    assert [r["step"] for r in single["cut_records"] if "eval" in r] == [4]
    assert "top_ops.txt" in single["trace"] and any(n.endswith(".json") for n in single["trace"])


@pytest.mark.slow
def test_rerunning_a_finished_run_reports_the_saved_values(single):
    rerun = single["rerun"]
    assert rerun["steps_done"] == 0 and rerun["last_step"] == 4
    # The same metrics file, no duplicate eval record.
    assert single["rerun_records"] == single["full_records"]
    last = single["full"][-1]
    assert rerun["final"], "a finished run reported final={}"
    for key, value in last.items():
        assert rerun["final"][key] == value, key
    assert [e["step"] for e in rerun["evals"]] == [4]
    assert rerun["evals"][-1] == single["full_evals"][-1]


@pytest.mark.slow
def test_nan_gradient_names_the_step_and_the_parameter(single):
    message = single["nan"]
    assert "step 1" in message, message
    assert "text.final_norm.weight" in message, message


# ----------------------------------------------------------------------------- two processes


def _two_process_checks(tmp: str) -> dict:
    import torch.distributed as dist

    tmp = Path(tmp)
    data = tmp / "data"
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ["RANK"])
    extra = dict(checkpoint__save_interval=2, parallel__use_distributed_optimizer=True,
                 train__eval_batches=0)  # fmt: skip
    full, seen = _recording_train(_cfg(tmp / "full", data, 4, **extra), keep_process_groups=True)
    out = {"full": full.losses, "seen": seen}
    dist.barrier()
    if rank == 0:
        shutil.copytree(tmp / "full", tmp / "cut")
        shutil.rmtree(tmp / "cut" / "checkpoints" / "step_00000004")
    dist.barrier()
    _next_layout()
    resumed = _recording_train(_cfg(tmp / "cut", data, 4, **extra), keep_process_groups=True)[0]
    out["resumed"] = resumed.losses
    full_p, resumed_p = _params(tmp / "full", 4), _params(tmp / "cut", 4)
    out["same_params"] = set(full_p) == set(resumed_p) and all(
        torch.equal(v, resumed_p[k]) for k, v in full_p.items()
    )
    out["records"] = _records(tmp / "full")

    # A DP-size change mid-epoch: from the DP2 step-2 checkpoint (16 of 24 samples read) on at
    # TP2 x DP1 for one step (4 more), then at TP1 x DP2 again for one step.
    out["dp_change"] = []
    step2, dp1 = tmp / "full" / "checkpoints" / "step_00000002", tmp / "dp1" / "checkpoints"
    for name, tp, steps, load in (("dp1", 2, 3, step2), ("dp2b", 1, 4, dp1)):
        _next_layout()
        cfg = _cfg(tmp / name, data, steps, parallel__tensor_parallel_size=tp,
                   train__eval_batches=0, checkpoint__load=str(load))  # fmt: skip
        out["dp_change"].append(_recording_train(cfg, keep_process_groups=True)[1])

    # TP=2 (then TP=2 + sequence parallel) over the same 4 steps as the one-process run.
    out["tp2"] = []
    for sp in (False, True):
        _next_layout()
        cfg = _cfg(tmp / f"tp2_sp{sp}", data, 4, parallel__tensor_parallel_size=2,
                   parallel__sequence_parallel=sp, train__eval_batches=0)  # fmt: skip
        out["tp2"].append(_recording_train(cfg, keep_process_groups=True)[0].losses)
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train2")
    return run_distributed(_two_process_checks, 2, str(tmp), timeout=900)


@pytest.mark.slow
def test_dp2_distributed_optimizer_resume_is_exact(two):
    for res in two:
        assert [r["step"] for r in res["resumed"]] == [3, 4]
        assert res["resumed"] == res["full"][2:]
        assert res["same_params"]
    # The two ranks read different samples: their local loss shares differ.
    a, b = (res["seen"][0]["local"] for res in two)
    assert a["long"] != b["long"]
    assert not set(two[0]["seen"][0]["ids"]) & set(two[1]["seen"][0]["ids"])


@pytest.mark.slow
def test_dp2_metrics_hold_global_values(two):
    # Issue 11 (b): metrics.jsonl (rank 0) holds the DP mean of loss parts, the sum of counts.
    records = [r for r in two[0]["records"] if "eval" not in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    counts_seen = set()
    for record, s0, s1 in zip(records, two[0]["seen"], two[1]["seen"], strict=True):
        names = list(s0["local"])
        for i, name in enumerate(names):
            a, b = s0["local"][name], s1["local"][name]
            if i < s0["num_parts"]:
                want = float((torch.tensor(a) + torch.tensor(b)) / 2)
            else:
                want = a + b
                counts_seen.add(name)
                assert a != b or a > 0, name  # real counts, not zeros
            assert record[name] == pytest.approx(want, rel=1e-6, abs=1e-7), (record["step"], name)
    assert {"n_region", "n_hard"} <= counts_seen
    # The losses the trainer returns are the same global values on both ranks.
    assert two[0]["full"] == two[1]["full"]


@pytest.mark.slow
def test_a_dp_size_change_mid_epoch_reads_each_sample_once(two):
    before = [i for res in two for s in res["seen"][:2] for i in s["ids"]]  # DP2, steps 1-2
    (dp1_r0, dp2_r0), (dp1_r1, dp2_r1) = two[0]["dp_change"], two[1]["dp_change"]
    assert [s["step"] for s in dp1_r0] == [3] and [s["step"] for s in dp2_r0] == [4]
    assert dp1_r0[0]["ids"] == dp1_r1[0]["ids"]  # TP ranks read the same batch
    middle = dp1_r0[0]["ids"]
    # The last 4 samples of epoch 0 go 2 + 2 to the DP2 ranks, then each starts epoch 1.
    last = [dp2_r0[0]["ids"], dp2_r1[0]["ids"]]
    epoch0 = before + middle + last[0][:2] + last[1][:2]
    assert sorted(epoch0) == list(range(24)), epoch0
    assert len(set(last[0][2:] + last[1][2:])) == 4


@pytest.mark.slow
def test_tp2_and_sequence_parallel_training_match_tp1(single, two):
    ref = single["full"]
    assert ref[-1]["loss"] != ref[0]["loss"]
    for res in two:
        for run in res["tp2"]:  # plain TP, then TP + SP (norm grads all-reduced over TP)
            for step, (a, b) in enumerate(zip(ref, run, strict=True)):
                for part in PARTS:
                    assert b[part] == pytest.approx(a[part], rel=1e-4, abs=1e-5), (step, part)
    assert two[0]["tp2"] == two[1]["tp2"]  # both TP ranks compute the same losses


# ----------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "field, value",
    [
        ("train.steps", -1),
        ("train.eval_batches", -1),
        ("train.log_interval", -5),
        ("train.eval_interval", -1),
        ("checkpoint.save_interval", -2),
        ("optim.lr", -1.0),
        ("model.logit_scale_init", float("nan")),
    ],
)
def test_bad_settings_fail_before_training_naming_the_field(tmp_path, field, value):
    from fgclip_mega.train.loop import train

    cfg = _cfg(tmp_path / "out", tmp_path / "data", 2)
    section, name = field.rsplit(".", 1)
    obj = cfg
    for part in section.split("."):
        obj = getattr(obj, part)
    setattr(obj, name, value)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(cfg)
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def _cli(out: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "fgclip_mega.train", "--preset", "tiny",
            "model.vision.layers=1", "model.text.layers=1", "data.micro_batch_size=4",
            "data.synthetic_num_samples=24", f"data.synthetic_dir={out.parent / 'data'}",
            f"train.output_dir={out}", "train.log_interval=1", *overrides]  # fmt: skip


@pytest.fixture(scope="module")
def missing_paths(tmp_path_factory):
    """stderr of `python -m fgclip_mega.train` given a missing path, per field (run at once)."""
    tmp = tmp_path_factory.mktemp("cli")
    cases = {"data.eval_shards": tmp / "nope", "checkpoint.load": tmp / "nope2"}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    commands = {field: _cli(tmp / field, f"{field}={path}") for field, path in cases.items()}
    return {
        field: (*result, str(cases[field]), tmp / field)
        for field, result in run_at_once(commands, env, timeout=180).items()
    }


def test_missing_paths_fail_in_one_line_before_training(missing_paths):
    for field, (rc, stdout, stderr, path, out) in missing_paths.items():
        assert rc == 2, (field, stderr)
        (line,) = stderr.strip().splitlines()
        assert line.startswith("error: ") and field in line and path in line, stderr
        assert stdout == ""
        assert not out.exists()  # nothing was built or trained


@pytest.mark.slow
def test_sigterm_saves_at_the_reached_step_and_a_rerun_resumes(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    cmd = _cli(out, "train.steps=500", "train.eval_batches=0", "checkpoint.save_interval=0")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        log = []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            log.append(line)
            if "step 1/500" in line:
                proc.send_signal(signal.SIGTERM)
                break
        assert any("step 1/500" in line for line in log), "".join(log)
        stdout, stderr = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    reached = summary["steps"]
    assert summary["preempted"] and 1 <= reached < 500
    assert summary["checkpoint"].endswith(f"step_{reached:08d}")
    from fgclip_mega.checkpoint import training as ckpt

    assert ckpt.newest_intact(out / "checkpoints").name == f"step_{reached:08d}"
    assert ckpt.read_meta(out / "checkpoints" / f"step_{reached:08d}")["step"] == reached
    assert "preemption signal SIGTERM" in stderr

    # The rerun continues from the saved step: one more step, not a restart.
    cmd = _cli(out, f"train.steps={reached + 1}", "train.eval_batches=0")
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["steps"] == reached + 1 and not summary["preempted"]
    assert f"resumed from {out / 'checkpoints' / f'step_{reached:08d}'} at step {reached}" in (
        rerun.stderr
    )
    steps = [r["step"] for r in _records(out) if "eval" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == reached + 1


def test_stage2_seeded_from_stage1_starts_its_temperatures_at_the_global_one(tmp_path):
    # FG-CLIP: stage 2 starts the region and hard-negative temperatures from the global one
    # learnt in stage 1 (they were left at their untrained initial value).
    from fgclip_mega.train.loop import train

    data = tmp_path / "data"
    one = _cfg(tmp_path / "s1", data, 3, train__stage="global", train__eval_batches=0)
    one.optim.lr = 5e-2  # move the global temperature visibly in 3 steps
    train(one)
    saved = _params(tmp_path / "s1", 3)
    assert saved["logit_scale"] != saved["logit_scale_hardneg"]
    two = _cfg(tmp_path / "s2", data, 4, train__stage="regional", train__eval_batches=0,
               checkpoint__load=str(tmp_path / "s1" / "checkpoints"))  # fmt: skip
    first = train(two).losses[0]
    assert first["step"] == 4
    assert first["scale_finegraind"] == first["scale_hardneg"] == first["scale"]
