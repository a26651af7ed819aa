"""The run/ scripts on a CPU machine: syntax, the GPU check's time budget and dry run, and
build_ext.sh's CUDA compiler discovery (fake nvcc / nvidia-smi, nothing is compiled)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted([*ROOT.glob("run/*.sh"), *ROOT.glob("run/slurm/*.sbatch")])
GPU_PARTS = {
    "build_ext",
    "pytest_roi_align",
    "pytest_losses",
    "pytest_attention",
    "pytest_dali_mixed",
    "train_features",
    "train_presets",
    "bench_step_mfu",
    "bench_loss",
}


def _gpu_check_module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "run/gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_bash_syntax(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_scripts_present():
    names = {str(p.relative_to(ROOT)) for p in SCRIPTS}
    for want in ("run/setup.sh", "run/build_ext.sh", "run/gpu_check.sh", "run/gpu_wheels.sh"):
        assert want in names
    assert "run/slurm/train.sbatch" in names


def _dry_run(tmp_path, *extra):
    env = dict(os.environ, FGCLIP_GPU_CHECK_NO_CUDA="1")
    env.pop("OUT", None)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, str(ROOT / "run/gpu_check.py"), "--out", str(tmp_path), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    (jsonl,) = tmp_path.glob("gpu_check_*.jsonl")  # gpu_check_<UTC time>-<host>.jsonl
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    return out, lines, time.monotonic() - start


def test_gpu_check_dry_run_skips_gpu_parts_and_fits_nine_minutes(tmp_path):
    out, lines, seconds = _dry_run(tmp_path, "--dry-run")
    assert out.returncode == 0, out.stdout + out.stderr
    assert seconds < 20  # no torch import in the driver
    plan, parts, summary = lines[0], lines[1:-1], lines[-1]
    assert plan["part"] == "plan" and summary["part"] == "summary"
    assert plan["cuda"] is False and plan["dry_run"] is True
    assert plan["deadline_s"] <= 540
    # Every part's own budget, and all of them together, fit the global 9-minute deadline.
    assert sum(plan["budgets"].values()) <= plan["deadline_s"]
    assert all(0 < b <= plan["deadline_s"] for b in plan["budgets"].values())
    by_name = {p["part"]: p for p in parts}
    assert set(by_name) == set(plan["budgets"])
    assert GPU_PARTS <= set(by_name)
    for name in GPU_PARTS:
        p = by_name[name]
        if p["status"] == "missing":  # an optional script not written yet
            assert "does not exist" in p["reason"]
        else:
            assert p["status"] == "skipped" and "no CUDA" in p["reason"], p
    # The printed progress names every part.
    for name in by_name:
        assert name in out.stdout


def test_gpu_check_outer_timeout_covers_only_the_deadline():
    text = (ROOT / "run/gpu_check.sh").read_text()
    limits = [int(x) for x in re.findall(r"timeout(?: -k \d+)? (\d+)", text)]
    assert limits, "gpu_check.sh must guard the driver with a timeout"
    deadline = _gpu_check_module().DEADLINE_S
    assert deadline <= 540 and all(deadline <= t <= 560 for t in limits)


def test_gpu_check_honours_the_global_deadline(tmp_path):
    # A deadline of 0: nothing may start, each part says why.
    out, lines, _ = _dry_run(tmp_path, "--deadline", "0")
    assert out.returncode == 0, out.stdout + out.stderr
    env_part = next(p for p in lines if p["part"] == "env")
    assert env_part["status"] == "skipped" and "deadline" in env_part["reason"]


def test_gpu_check_kills_a_part_at_its_budget(tmp_path):
    gc = _gpu_check_module()
    # The part starts a grandchild: the whole process group must go at the timeout.
    part = gc.Part("sleepy", 1, ["bash", "-c", "sleep 30 & echo '{\"x\": 1}'; wait"], cuda=False)
    start = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        result = gc.run_part(part, 1.0, dict(os.environ), log, tmp_path)
    assert time.monotonic() - start < 10
    assert result["status"] == "timeout"
    quick = gc.Part("quick", 5, ["bash", "-c", "echo '{\"ms\": 2.5}'; echo not json"], cuda=False)
    with open(tmp_path / "log", "w") as log:
        result = gc.run_part(quick, 5.0, dict(os.environ), log, tmp_path)
    assert result["status"] == "ok" and result["records"] == [{"ms": 2.5}]


def test_gpu_check_reads_pytest_junit(tmp_path):
    gc = _gpu_check_module()
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="boom&#10;more"/>'
        "</testcase>"
        '<testcase classname="tests.test_a" name="test_skip"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    got = gc.junit_summary(xml)
    assert got["tests"] == {"tests": 3, "failures": 1, "errors": 0, "skipped": 1, "passed": 1}
    assert got["failures"] == ["tests.test_a::test_bad: boom"]


# ---------------------------------------------------------------- build_ext.sh CUDA discovery


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    nvcc = root / "bin/nvcc"
    nvcc.write_text("#!/bin/sh\necho fake nvcc\n")
    nvcc.chmod(0o755)
    (root / "include/cuda_runtime.h").write_text("// fake\n")
    return root


def _build_ext(tmp_path, *args, path_dirs=(), pythonpath=None):
    env = {
        "HOME": os.environ.get("HOME", "/tmp"),
        # No system toolkit, no nvcc wrapper from /usr/local/bin.
        "PATH": os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"]),
        "FGCLIP_CUDA_SEARCH": "",
        "FGCLIP_PYTHON": sys.executable,
        "FGCLIP_BUILD_DIR": str(tmp_path / "build"),
    }
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run(
        ["bash", str(ROOT / "run/build_ext.sh"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def _venv_has_nvcc() -> bool:
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"], "nvidia/cu13/bin/nvcc").exists()


def test_build_ext_finds_nvcc_on_path(tmp_path):
    root = _fake_toolkit(tmp_path / "toolkit")
    out = _build_ext(tmp_path, "--find-cuda", path_dirs=[root / "bin"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(root.resolve())


def test_build_ext_skips_an_nvcc_wrapper_without_headers(tmp_path):
    if _venv_has_nvcc():
        pytest.skip("this python's site-packages holds a real PyPI nvcc")
    wrapper = tmp_path / "wrapbin"
    wrapper.mkdir()
    (wrapper / "nvcc").write_text('#!/bin/sh\nexec /elsewhere/nvcc "$@"\n')
    (wrapper / "nvcc").chmod(0o755)
    out = _build_ext(tmp_path, "--find-cuda", path_dirs=[wrapper])
    assert out.returncode == 1 and "no CUDA toolkit" in out.stderr


def test_build_ext_finds_the_pypi_nvcc_in_site_packages(tmp_path):
    site = tmp_path / "site-packages"
    root = _fake_toolkit(site / "nvidia/cu13")
    out = _build_ext(tmp_path, "--find-cuda", pythonpath=site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(root.resolve())
    # CUDA_HOME wins over site-packages.
    other = _fake_toolkit(tmp_path / "cuda_home")
    env_out = subprocess.run(
        ["bash", str(ROOT / "run/build_ext.sh"), "--find-cuda"],
        capture_output=True,
        text=True,
        env={
            "PATH": "/usr/bin:/bin",
            "FGCLIP_CUDA_SEARCH": "",
            "FGCLIP_PYTHON": sys.executable,
            "PYTHONPATH": str(site),
            "CUDA_HOME": str(other),
        },
        timeout=120,
    )
    assert env_out.stdout.strip() == str(other.resolve()), env_out.stderr


def test_build_ext_refuses_cpu_only_build_when_a_gpu_is_present(tmp_path):
    if _venv_has_nvcc():
        pytest.skip("this python's site-packages holds a real PyPI nvcc")
    fakebin = tmp_path / "fakebin"
    fakebin.mkdir()
    smi = fakebin / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-00000000-fake)'\n")
    smi.chmod(0o755)
    out = _build_ext(tmp_path, path_dirs=[fakebin])
    assert out.returncode == 1
    assert "NVIDIA H200" in out.stderr and "no CUDA compiler" in out.stderr
    assert "requirements-cuda.txt" in out.stderr
    # It stopped before configuring anything.
    assert not (tmp_path / "build/build.ninja").exists()
    # Without the GPU, the same machine builds the CPU op only (checked up to the decision).
    out = _build_ext(tmp_path, "--find-cuda")
    assert out.returncode == 1 and "no CUDA toolkit" in out.stderr
