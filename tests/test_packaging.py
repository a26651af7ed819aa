"""The package as users install it: a wheel built by the standard front-end (`python -m build`)
from a copy of this working tree, installed into a fresh venv, runs its console scripts.

What this proves and what it does not: the fresh venv is created by `python -m venv` and gets only
the wheel (`pip install --no-deps --no-index`); torch and the other dependencies (5+ GB) are made
visible from .venv through a path entry (a .pth line: .venv's own .pth files, among them this
checkout's editable install, are not processed), so the code that runs is the wheel's. The wheel's
declared dependencies are checked against the pinned run/requirements.txt (every pin satisfies
its range) and by `pip check`; an online resolve of those ranges is not done here. The build uses
`--no-isolation` (this venv's setuptools; an isolated build would download setuptools)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("fgclip-train", "fgclip-eval", "fgclip-prep", "fgclip-env", "fgclip-export")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    # Outside the checkout: `python -c` puts the working directory first on sys.path.
    kw.setdefault("cwd", "/")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, (
        f"{cmd}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc


def _source_copy(dst: Path) -> Path:
    """The files a build reads (pyproject, README, the three packages) plus a CMake build/lib
    with the compiled RoIAlign library, as a developer's checkout has it."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("fgclip_mega", "kernels", "data_prep"):
        shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dst / name)
    (dst / "build" / "lib").mkdir(parents=True)
    (dst / "build" / "lib" / "libfgclip_roi_align_cpu.so").write_bytes(b"\x7fELF not really")
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pkg")
    src = _source_copy(tmp / "src")
    dist = tmp / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist),
          str(src)])  # fmt: skip
    (wheel,) = dist.glob("fgclip_mega-*.whl")
    venv = tmp / "fresh"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", str(wheel)])  # fmt: skip
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())  # fmt: skip
    deps = _run([sys.executable, "-c", "import torch, pathlib; "
                 "print(pathlib.Path(torch.__file__).parents[1])"]).stdout.strip()  # fmt: skip
    (site / "zz_dependencies_from_dev_venv.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FGCLIP_EXT_DIR")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return {"wheel": wheel, "venv": venv, "py": py, "site": site, "src": src, "env": env}


@pytest.mark.slow
def test_wheel_holds_the_packages_and_scripts_and_no_cmake_output(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert not [n for n in names if n.endswith(".so")], "the CMake build/lib leaked into the wheel"
    for pkg in ("fgclip_mega/train/__main__.py", "fgclip_mega/checkpoint/export.py",
                "kernels/roi_align/_lib.py", "data_prep/cli.py"):  # fmt: skip
        assert pkg in names, pkg
    assert not [n for n in names if n.startswith("tests/")]
    # The developer's CMake output is untouched by the build (setuptools builds elsewhere).
    assert sorted(p.name for p in (installed["src"] / "build" / "lib").iterdir()) == [
        "libfgclip_roi_align_cpu.so"
    ]
    for script in SCRIPTS:
        assert (installed["venv"] / "bin" / script).is_file(), script


@pytest.mark.slow
def test_declared_dependencies_hold_for_the_pinned_versions(installed):
    from importlib.metadata import Distribution

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    (info,) = installed["site"].glob("fgclip_mega-*.dist-info")
    meta = Distribution.at(info).metadata
    reqs = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    pins = {}
    for line in (ROOT / "run" / "requirements.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pins[canonicalize_name(name)] = version
    base = [r for r in reqs if r.marker is None]
    assert {canonicalize_name(r.name) for r in base} >= {"torch", "megatron-core", "zarr",
                                                        "transformers", "pyyaml"}  # fmt: skip
    for r in reqs:  # base and extras alike: what the pinned install has satisfies each range
        name = canonicalize_name(r.name)
        if name == "fgclip-mega":  # dev = fgclip_mega[loggers]
            continue
        assert name in pins, f"{r} is declared but not pinned in run/requirements.txt"
        assert r.specifier.contains(pins[name], prereleases=True), (str(r), pins[name])
    extras = set(meta.get_all("Provides-Extra"))
    assert {"gpu", "dev", "loggers"} <= extras
    check = subprocess.run([sys.executable, "-m", "pip", "--python", str(installed["py"]),
                            "check"], capture_output=True, text=True, cwd="/")  # fmt: skip
    mine = [line for line in check.stdout.splitlines() if line.lower().startswith("fgclip")]
    assert not mine, check.stdout


@pytest.mark.slow
def test_console_scripts_run_from_the_fresh_venv(installed, built_library):
    env, bin_ = installed["env"], installed["venv"] / "bin"
    where = _run([str(installed["py"]), "-c", "import fgclip_mega, kernels; "
                  "print(fgclip_mega.__file__); print(kernels.__file__)"], env=env)  # fmt: skip
    for path in where.stdout.split():
        assert path.startswith(str(installed["site"])), where.stdout  # the wheel's code runs
    for script in ("fgclip-train", "fgclip-eval", "fgclip-export"):
        out = _run([str(bin_ / script), "--help"], env=env).stdout
        assert "usage:" in out, (script, out)
    assert "synthetic" in _run([str(bin_ / "fgclip-prep")], env=env).stdout

    # fgclip-env: no build/ beside an installed package: one message naming the command that
    # builds the kernels and how to point the package at them.
    report = json.loads(_run([str(bin_ / "fgclip-env"), "--preset", "tiny", "--json"],
                             env=env).stdout)  # fmt: skip
    roi = report["roi_align_ext"]
    assert not roi["available"]
    probe = ("from kernels.roi_align import ops\n"
             "try:\n    ops.select_backend('cpu', 'cpu')\nexcept RuntimeError as e:\n"
             "    print(e)\n")  # fmt: skip
    message = _run([str(installed["py"]), "-c", probe], env=env).stdout.strip()
    assert "bash run/build_ext.sh" in message and "FGCLIP_EXT_DIR=" in message, message
    assert "carries no compiled kernels" in message, message
    # Pointed at this checkout's CMake build, the installed package loads the compiled op.
    env2 = {**env, "FGCLIP_EXT_DIR": str(built_library.directory)}
    report = json.loads(_run([str(bin_ / "fgclip-env"), "--preset", "tiny", "--json"],
                             env=env2).stdout)  # fmt: skip
    assert report["roi_align_ext"]["available"], report["roi_align_ext"]
