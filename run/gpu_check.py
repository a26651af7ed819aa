"""The GPU check: every GPU path of fgclip_mega in at most 9 minutes, installs included.

    bash run/gpu_check.sh                      # on a GPU machine (what the device tool runs)
    python run/gpu_check.py --dry-run          # the plan as JSON lines; runs nothing
    python run/gpu_check.py --collect DIR      # copy a fetched device $OUT into run/results/

Each part runs as a subprocess with its own time budget (PARTS below, 540 s in all) under a global
deadline: a part gets min(its budget, time left) and is killed with its whole process group when
that runs out; a part that cannot start before the deadline is reported as skipped. Parts that
need CUDA are skipped, with a JSON line saying so, on a machine without a GPU. Optional scripts
written elsewhere (run/bench_step.py ...) are reported as 'missing' when absent.

Results go to $OUT (set by the device tool) or, when unset, run/results/<UTC time>-<host>/:
  gpu_check.jsonl  one line per part (status, seconds, budget, pytest counts and failures) and
                   one {"part", "record"} line per JSON line a part printed (benchmarks)
  gpu_check.log    everything every part printed
Only the standard library is imported here, so the plan is instant and a broken torch install is
reported by a part instead of killing the driver.
"""

from __future__ import annotations

import argparse
import glob
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
DALI_TESTS = ["tests/test_loader.py"]


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


def _pytest(files: list[str], ignore: list[str] | None = None) -> list[str]:
    cmd = [PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files]
    return cmd + [f"--ignore={f}" for f in ignore or []]


def _bench_loss_args() -> list[str]:
    # The per-rank shape of issue 14: b = 256 local rows x B = 32K gathered columns, d = 768,
    # bf16; naive (the baseline of the ratios), chunked and Triton.
    return ["--grid", "rect", "--rows", "256", "--cols", "32768", "--dims", "768",
            "--dtypes", "bf16", "--impls", "naive", "chunked", "triton"]  # fmt: skip


def parts() -> list[Part]:
    wheels = sorted(glob.glob(str(ROOT / ".whl/*.whl")))
    install = [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile"]
    install += ["--no-cache-dir", "--upgrade", "--target", SITE, *wheels]
    env_report = "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "
    env_report += f"{PY} -m fgclip_mega.env --json"
    return [
        Part("install_wheels", 20, install if wheels else [], cuda=False),
        Part("env", 15, ["bash", "-c", env_report], cuda=False),
        Part(
            "build_ext", 90, ["bash", "run/build_ext.sh"], env={"FGCLIP_PYTHON": PY}
        ),  # fresh CUDA build against this machine's torch
        Part("pytest_roi_align", 45, _pytest(ROI_TESTS), junit=True),
        Part("pytest_losses", 70, _pytest(LOSS_TESTS), junit=True),
        Part("pytest_attention", 35, _pytest(ATTENTION_TESTS), junit=True),
        Part("pytest_dali_mixed", 25, _pytest(DALI_TESTS), module="nvidia.dali", junit=True),
        Part(
            "pytest_other",
            25,
            _pytest(["tests"], ROI_TESTS + LOSS_TESTS + ATTENTION_TESTS + DALI_TESTS),
            junit=True,
        ),
        Part("train_step", 100, [PY, "run/gpu_train_step.py"], script="run/gpu_train_step.py"),
        Part(
            "bench_step_mfu",
            40,
            [PY, "run/bench_step.py", "--preset", "fgclip_vit_b16", "--stage", "global"],
            script="run/bench_step.py",
        ),
        Part(
            "bench_loss",
            40,
            [PY, "run/bench_loss.py", *_bench_loss_args()],
            script="run/bench_loss.py",
        ),
        Part(
            "bench_roi_align",
            25,
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
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return ROOT / "run/results" / f"{stamp}-{socket.gethostname()}"


def collect(src: Path) -> Path:
    # A device call's files come back elsewhere: keep them in the repo's results layout.
    files = sorted(src.glob("gpu_check.*"))
    if not files:
        raise SystemExit(f"--collect {src}: no gpu_check.jsonl / gpu_check.log there")
    plan = json.loads((src / "gpu_check.jsonl").read_text().splitlines()[0])
    dest = ROOT / "run/results" / f"{plan.get('started', 'unknown')}-{plan.get('host', 'device')}"
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy2(f, dest / f.name)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    p.add_argument("--out", help="results folder (default: $OUT, else run/results/<time>-<host>)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="global limit in seconds")
    p.add_argument("--only", nargs="*", help="run only these parts (names as in the plan)")
    p.add_argument("--collect", type=Path, help="copy a fetched device $OUT into run/results/")
    args = p.parse_args(argv)
    if args.collect:
        print(collect(args.collect))
        return 0

    t0 = time.monotonic()
    out = Path(args.out or os.environ.get("OUT") or default_out())
    out.mkdir(parents=True, exist_ok=True)
    cuda = cuda_present()
    plan = parts()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    jsonl = (out / "gpu_check.jsonl").open("w")
    log = (out / "gpu_check.log").open("w")

    def emit(obj: dict) -> None:
        jsonl.write(json.dumps(obj) + "\n")
        jsonl.flush()

    def progress(msg: str) -> None:
        print(f"[gpu_check {time.monotonic() - t0:5.0f}s/{args.deadline:.0f}s] {msg}", flush=True)

    emit(
        {
            "part": "plan",
            "started": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()),
            "host": socket.gethostname(),
            "python": PY,
            "cuda": cuda,
            "dry_run": args.dry_run,
            "deadline_s": args.deadline,
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
        elif part.cuda and not cuda:
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
            line.update(run_part(part, min(part.budget_s, left), env, log, tmp))
            if part.name == "install_wheels" and line["status"] == "ok":
                env["PYTHONPATH"] += os.pathsep + SITE
        records = line.pop("records", [])
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
