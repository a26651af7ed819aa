"""The GPU check: every GPU path of fgclip_mega in at most 9 minutes, installs included.

    bash run/gpu_check.sh                      # on a GPU machine (what the device tool runs)
    python run/gpu_check.py --dry-run          # the plan as JSON lines; runs nothing
    python run/gpu_check.py --cpu-dry-run      # every part's CPU stand-in, tiny sizes (no GPU)
    python run/gpu_check.py --collect DIR      # copy a fetched device $OUT into run/results/

What it covers: the CUDA RoIAlign build and tests; the Triton loss tests with the autotuner pinned
to one tile (FGCLIP_LOSS_TILE: one binary per kernel variant, not four); the other GPU-marked
tests, found by their marker (no collection of the whole suite); training steps (run/
gpu_train_step.py) on an NCCL process group of one with megatron DDP overlap_grad_reduce and the
distributed optimizer, activation checkpointing, SigLIP (loss.kind=sigmoid), evaluation, SDPA
asserted to run flash or cuDNN (math disallowed), torch.cuda.set_sync_debug_mode("error") over
whole stage-2 steps; the presets at full depth; and the benchmarks.
--cpu-dry-run runs, without a GPU, what each part can run on a CPU (the env report, the CPU
extension build, pytest collection of the GPU tests, the training cases on the tiny preset with
the GPU's overlap_grad_reduce default, a tiny loss benchmark) under the same deadline logic, so
the driver, the parts' commands and the training options are exercised before a GPU is lent.

Each part runs as a subprocess with its own time budget (PARTS below, 540 s in all) under a global
deadline: a part gets min(its budget, time left) and is killed with its whole process group when
that runs out; a part that cannot start before the deadline is reported as skipped. Parts that
need CUDA are skipped, with a JSON line saying so, on a machine without a GPU. Optional scripts
written elsewhere (run/bench_step.py ...) are reported as 'missing' when absent.

Results go to $OUT (set by the device tool) or, when unset, run/results/, as
  gpu_check_<UTC time>-<host>.jsonl  one object per part ("part", "status", "pass", "seconds",
                   "budget_s", pytest counts and failures) and one {"part", "record"} line per
                   JSON line a part printed (training cases, benchmarks)
  gpu_check_<UTC time>-<host>.log    everything every part printed
Only the standard library is imported here, so the plan is instant and a broken torch install is
reported by a part instead of killing the driver.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 540  # 9 minutes: the whole check, wheel installs included
SITE = "/tmp/fgclip_site"  # where the carried wheels are installed (PYTHONPATH)
PY = sys.executable

# pytest files of each GPU part; the 'pytest_other' part runs every other GPU test.
ROI_TESTS = ["tests/test_roi_align.py"]
LOSS_TESTS = ["tests/test_contrastive_kernels.py", "tests/test_losses.py"]
ATTENTION_TESTS = ["tests/test_attention.py", "tests/test_model.py"]
DALI_TESTS = ["tests/test_loader.py", "tests/test_naflex_dali.py"]
# The one tile every Triton loss kernel uses in the check: autotuning over GPU_TILES would JIT
# 3-4 binaries per kernel variant and shape class (176-212 in the loss tests).
LOSS_TILE = {"FGCLIP_LOSS_TILE": "64,64,4,3"}


@dataclass
class Part:
    name: str
    budget_s: int
    cmd: list[str]
    cuda: bool = True
    """Needs a CUDA device (skipped without one)."""
    script: str = ""
    """Repo-relative script the part runs; 'missing' when absent."""
    module: str = ""
    """Python module the part needs; skipped when not importable."""
    junit: bool = False
    """A pytest part: counts and failures come from its JUnit XML."""
    env: dict[str, str] = field(default_factory=dict)
    cpu_cmd: list[str] | None = None
    """What --cpu-dry-run runs instead (tiny sizes, no GPU); None = CUDA only."""


def _pytest(files: list[str], workers: int = 0) -> list[str]:
    cmd = [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    if workers and importlib.util.find_spec("xdist") is not None:
        # Each worker JIT-compiles its tests' kernels: on 16 cores the compiles run in parallel.
        cmd += ["-n", str(workers)]  # pytest-xdist (in the device image's package list)
    return cmd


def _collect(files: list[str]) -> list[str]:
    # CPU stand-in of a pytest part: the files are collected (imports; conftest deselects and
    # counts the GPU tests), nothing runs.
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", *files]


def other_gpu_tests(exclude: list[str]) -> list[str]:
    """Test files with a GPU-marked test not run by another part (found by their marker, so the
    part imports only those files)."""
    out = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        rel = str(path.relative_to(ROOT))
        if rel not in exclude and "pytest.mark.gpu" in path.read_text(errors="replace"):
            out.append(rel)
    return out


def _bench_loss_args() -> list[str]:
    # The per-rank shape of issue 14: b = 256 local rows x B = 32K gathered columns, d = 768,
    # bf16; naive (the baseline of the ratios), chunked and Triton.
    return [
        "--grid",
        "rect",
        "--rows",
        "256",
        "--cols",
        "32768",
        "--dims",
        "768",
        "--dtypes",
        "bf16",
        "--impls",
        "naive",
        "chunked",
        "triton",
    ]


def parts() -> list[Part]:
    wheels = sorted(glob.glob(str(ROOT / ".whl/*.whl")))
    install = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    install += ["--no-cache-dir", "--upgrade", "--target", SITE, *wheels]
    env_report = "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "
    env_report += f"{PY} -m fgclip_mega.env --json"
    other = other_gpu_tests(ROI_TESTS + LOSS_TESTS + ATTENTION_TESTS + DALI_TESTS)
    train = [PY, "run/gpu_train_step.py"]
    # CPU stand-ins: the same cases on the tiny preset (the GPU's overlap_grad_reduce default
    # is imitated by --cpu), one step each.
    cpu_cases = ["tiny:regional:distopt+ckpt+sdpa", "tiny:regional:syncdebug+eval"]
    cpu_cases += ["tiny:global:siglip", "fgclip2_tiny:global", "fgclip2_tiny:regional:distopt"]
    tiny_loss = [
        "--grid",
        "rect",
        "--rows",
        "32",
        "--cols",
        "256",
        "--dims",
        "64",
        "--dtypes",
        "fp32",
        "--impls",
        "naive",
        "chunked",
        "--repeats",
        "1",
    ]
    return [
        Part("install_wheels", 20, install if wheels else [], cuda=False),
        Part("env", 20, ["bash", "-c", env_report], cuda=False),
        # A fresh CUDA build against this machine's torch.
        Part(
            "build_ext",
            60,
            ["bash", "run/build_ext.sh"],
            env={"FGCLIP_PYTHON": PY},
            cpu_cmd=["bash", "run/build_ext.sh"],
        ),
        Part("pytest_roi_align", 40, _pytest(ROI_TESTS), junit=True, cpu_cmd=_collect(ROI_TESTS)),
        Part(
            "pytest_losses",
            75,
            _pytest(LOSS_TESTS, workers=8),
            junit=True,
            env=LOSS_TILE,
            cpu_cmd=_collect(LOSS_TESTS),
        ),
        Part(
            "pytest_attention",
            30,
            _pytest(ATTENTION_TESTS),
            junit=True,
            cpu_cmd=_collect(ATTENTION_TESTS),
        ),
        Part("pytest_dali_mixed", 15, _pytest(DALI_TESTS), module="nvidia.dali", junit=True),
        Part(
            "pytest_other",
            20,
            _pytest(other) if other else [],
            junit=True,
            cpu_cmd=_collect(other) if other else None,
        ),
        # NCCL world of one: DDP overlap + distributed optimizer + activation checkpointing +
        # SDPA flash/cuDNN only; sync debug "error" over stage-2 steps + eval; SigLIP. 2 layers.
        Part(
            "train_features",
            130,
            [*train, "--layers", "2", "--steps", "3"],
            env=LOSS_TILE,
            script="run/gpu_train_step.py",
            cpu_cmd=[*train, "--cpu", "--steps", "2", "--micro-batch", "4", "--cases", *cpu_cases],
        ),
        # B/16 and L/14-336 at full depth, stage 2 (every loss term), bf16.
        Part(
            "train_presets",
            65,
            [*train, "--presets", "--steps", "2"],
            env=LOSS_TILE,
            script="run/gpu_train_step.py",
        ),
        Part(
            "bench_step_mfu",
            25,
            [PY, "run/bench_step.py", "--preset", "fgclip_vit_b16", "--stage", "global"],
            script="run/bench_step.py",
        ),
        Part(
            "bench_loss",
            25,
            [PY, "run/bench_loss.py", *_bench_loss_args()],
            script="run/bench_loss.py",
            cpu_cmd=[PY, "run/bench_loss.py", *tiny_loss],
        ),
        Part(
            "bench_roi_align",
            15,
            [PY, "run/bench_roi_align.py", "--device", "cuda", "--iters", "20"],
            script="run/bench_roi_align.py",
        ),
    ]


def cuda_present() -> bool:
    # No torch import (6 s on a CPU box): the driver's own view of the GPU.
    if os.environ.get("FGCLIP_GPU_CHECK_NO_CUDA") == "1":
        return False
    if glob.glob("/proc/driver/nvidia/gpus/*"):
        return True
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU " in out.stdout


def module_present(name: str, env: dict[str, str]) -> bool:
    code = f"import importlib.util,sys; sys.exit(importlib.util.find_spec({name!r}) is None)"
    try:
        return subprocess.run([PY, "-c", code], env=env, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired, ModuleNotFoundError):
        return False


def junit_summary(path: Path) -> dict:
    if not path.exists():
        return {"tests": {}, "failures": ["no JUnit XML written (pytest did not finish)"]}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors")}
    counts["skipped"] = sum(int(s.get("skipped", 0)) for s in suites)
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            msg = (bad.get("message") or "").splitlines()[:1]
            failed.append(f"{case.get('classname')}::{case.get('name')}: {' '.join(msg)[:200]}")
    return {"tests": counts, "failures": failed[:20]}


def json_records(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out


def run_part(part: Part, timeout: float, env: dict[str, str], log, tmp: Path) -> dict:
    cmd = list(part.cmd)
    xml = tmp / f"{part.name}.xml"
    if part.junit:
        cmd.append(f"--junitxml={xml}")
    log.write(f"\n===== {part.name}: {' '.join(cmd)}\n")
    log.flush()
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, **part.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # its own process group: a timeout kills its children too
    )
    timed_out = False
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                output, _ = proc.communicate(timeout=3)
                break
            except subprocess.TimeoutExpired:
                output = ""
    seconds = time.monotonic() - start
    log.write(output or "")
    log.flush()
    result = {"rc": proc.returncode, "seconds": round(seconds, 1)}
    if timed_out:
        result["status"] = "timeout"
    elif part.junit and proc.returncode == 5:  # pytest: no test selected
        result["status"] = "ok"
        result["reason"] = "no GPU tests selected"
    else:
        result["status"] = "ok" if proc.returncode == 0 else "failed"
    if part.junit:
        result.update(junit_summary(xml))
    if result["status"] != "ok":
        result["tail"] = (output or "").splitlines()[-15:]
    result["records"] = json_records(output or "")
    return result


def default_out() -> Path:
    return ROOT / "run/results"


def collect(src: Path) -> Path:
    # A device call's files come back elsewhere: keep them beside the repo's other results.
    files = sorted(src.glob("gpu_check_*.jsonl")) + sorted(src.glob("gpu_check_*.log"))
    if not files:
        raise SystemExit(f"--collect {src}: no gpu_check_*.jsonl / gpu_check_*.log there")
    dest = ROOT / "run/results"
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dest / f.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument(
        "--cpu-dry-run", action="store_true", help="run each part's CPU stand-in (tiny sizes)"
    )
    p.add_argument("--out", help="results folder (default: $OUT, else run/results/)")
    p.add_argument("--deadline", type=float, help=f"global limit in seconds ({DEADLINE_S})")
    p.add_argument("--only", nargs="*", help="run only these parts (names as in the plan)")
    p.add_argument("--collect", type=Path, help="copy a fetched device $OUT into run/results/")
    args = p.parse_args(argv)
    if args.collect:
        print(collect(args.collect))
        return 0

    # The CPU stand-ins run on a small shared CPU (2 cores: `import torch` alone ~6 s): three
    # times every budget there, so a slow import is not reported as a timeout.
    scale = 3 if args.cpu_dry_run else 1
    if args.deadline is None:
        args.deadline = DEADLINE_S * scale
    t0 = time.monotonic()
    out = Path(args.out or os.environ.get("OUT") or default_out())
    out.mkdir(parents=True, exist_ok=True)
    cuda = cuda_present() and not args.cpu_dry_run
    plan = parts()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stem = f"gpu_check_{started}-{socket.gethostname()}"
    if args.cpu_dry_run:
        stem += "-cpu-dry-run"
    jsonl = (out / f"{stem}.jsonl").open("w")
    log = (out / f"{stem}.log").open("w")

    def emit(obj: dict) -> None:
        jsonl.write(json.dumps(obj) + "\n")
        jsonl.flush()

    def progress(msg: str) -> None:
        print(f"[gpu_check {time.monotonic() - t0:5.0f}s/{args.deadline:.0f}s] {msg}", flush=True)

    emit(
        {
            "part": "plan",
            "started": started,
            "host": socket.gethostname(),
            "python": PY,
            "cuda": cuda,
            "dry_run": args.dry_run,
            "cpu_dry_run": args.cpu_dry_run,
            "deadline_s": args.deadline,
            "budget_scale": scale,
            "budgets": {part.name: part.budget_s for part in plan},
        }
    )
    failed, tmp = [], Path(tempfile.mkdtemp(prefix="gpu_check_"))
    for part in plan:
        line = {"part": part.name, "budget_s": part.budget_s}
        left = args.deadline - (time.monotonic() - t0)
        if args.only is not None and part.name not in args.only:
            line.update(status="skipped", reason="not in --only")
        elif part.script and not (ROOT / part.script).exists():
            line.update(status="missing", reason=f"{part.script} does not exist yet")
        elif args.cpu_dry_run and part.name == "install_wheels":
            line.update(status="skipped", reason="the CPU dry run uses this machine's packages")
        elif args.cpu_dry_run and part.cuda and part.cpu_cmd is None:
            line.update(status="skipped", reason="no CUDA device on this machine (CUDA only)")
        elif part.cuda and not cuda and not args.cpu_dry_run:
            line.update(status="skipped", reason="no CUDA device on this machine")
        elif not part.cmd:
            line.update(status="skipped", reason="nothing to do (no .whl/*.whl carried)")
        elif args.dry_run:
            line.update(status="dry-run", cmd=part.cmd)
        elif left < 5:
            line.update(status="skipped", reason=f"global deadline: {left:.0f} s left")
        elif part.module and not module_present(part.module, env):
            line.update(status="skipped", reason=f"{part.module} is not installed")
        else:
            progress(f"{part.name} (budget {part.budget_s} s) ...")
            if args.cpu_dry_run and part.cpu_cmd is not None:
                part = dataclasses.replace(part, cmd=part.cpu_cmd, env={}, junit=False)
                line["cpu_stand_in"] = True
            line.update(run_part(part, min(scale * part.budget_s, left), env, log, tmp))
            if part.name == "install_wheels" and line["status"] == "ok":
                env["PYTHONPATH"] += os.pathsep + SITE
        records = line.pop("records", [])
        # pass: it ran and succeeded; None: not run here (skipped, missing, dry run).
        line["pass"] = {"ok": True, "failed": False, "timeout": False}.get(line["status"])
        line.setdefault("seconds", 0.0)
        emit(line)
        for rec in records:
            emit({"part": part.name, "record": rec})
        if line["status"] in ("failed", "timeout"):
            failed.append(part.name)
        progress(f"{part.name}: {line['status']} {line.get('reason', '')}".rstrip())
        for msg in line.get("failures", [])[:5]:
            print(f"    FAILED {msg}", flush=True)
    total = round(time.monotonic() - t0, 1)
    emit({"part": "summary", "seconds": total, "failed": failed, "out": str(out)})
    progress(f"done in {total} s; failed: {failed or 'none'}; results in {out}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
