"""A GPU that torch cannot use is an error, not a silent CPU run (issue 21, item 1).

The pinned torch is the CUDA 13 build: on a node whose driver is older than R580,
`torch.cuda.is_available()` is False and the trainer used to pick gloo, the CPU compatibility
mode and fp32 without a word. The probe in `fgclip_mega.runtime` now sees the GPU without CUDA
(device nodes, the driver's /proc file) and raises, naming the driver and torch's CUDA version
and the fix. Here the probe is faked (this machine has no GPU): in-process for the decision, and
in fresh processes for what `python -m fgclip_mega.env` and `python -m fgclip_mega.train` print.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from fgclip_mega import runtime as rt
from tests.builders import run_at_once

DRIVER = "535.104.05"  # an R535 driver: too old for CUDA 13


@pytest.fixture
def old_driver_node(monkeypatch):
    """This process as a GPU node whose driver this torch cannot use."""
    monkeypatch.setattr(rt, "gpu_present", lambda: True)
    monkeypatch.setattr(rt, "nvidia_driver_version", lambda: DRIVER)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(rt.ALLOW_CPU_ENV, raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _check_message(text: str) -> None:
    assert f"driver {DRIVER}" in text, text
    assert f"CUDA {torch.version.cuda}" in text if torch.version.cuda else "CPU-only" in text
    assert "R580" in text and "pip install torch==" in text and "whl/cu12" in text, text
    assert "FGCLIP_ALLOW_CPU=1" in text, text


def test_a_present_but_unusable_gpu_is_an_error(old_driver_node, monkeypatch):
    from fgclip_mega.parallel import bootstrap

    with pytest.raises(rt.GPUUnusableError) as err:
        rt.cuda_available()
    _check_message(str(err.value))
    with pytest.raises(rt.GPUUnusableError):
        rt.default_device()
    # The trainer's first step stops before any process group exists.
    import torch.distributed as dist

    started = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: started.append(kw))
    with pytest.raises(rt.GPUUnusableError):
        bootstrap.init_distributed("auto")
    assert started == []


def test_the_cpu_can_be_asked_for_explicitly(old_driver_node, monkeypatch):
    monkeypatch.setenv(rt.ALLOW_CPU_ENV, "1")
    assert rt.cuda_available() is False
    assert rt.default_device() == torch.device("cpu")
    monkeypatch.delenv(rt.ALLOW_CPU_ENV)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # every GPU hidden on purpose
    assert rt.cuda_available() is False


def test_no_gpu_is_a_cpu_machine(monkeypatch):
    monkeypatch.setattr(rt, "gpu_present", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rt.cuda_available() is False


def test_driver_version_from_the_proc_file():
    closed = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15 UTC 2023"
    opened = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build"
    assert rt.parse_driver_version(closed) == "535.104.05"
    assert rt.parse_driver_version(opened) == "580.65.06"
    assert rt.parse_driver_version("garbage") is None


_FAKE = (
    "import sys; import fgclip_mega.runtime as rt; "
    "rt.gpu_present = lambda: True; "
    f"rt.nvidia_driver_version = lambda: {DRIVER!r}; "
)


def test_env_and_train_report_it_in_one_line(tmp_path):
    out = tmp_path / "out"
    train_args = ["--preset", "tiny", "model.vision.layers=1", "model.text.layers=1",
                  f"data.synthetic_dir={tmp_path / 'data'}", f"train.output_dir={out}"]  # fmt: skip
    scripts = {
        "env": _FAKE + "from fgclip_mega.env import main; sys.exit(main([]))",
        "train": _FAKE
        + f"from fgclip_mega.train.__main__ import main; sys.exit(main({train_args!r}))",
    }
    env = {
        k: v for k, v in os.environ.items() if k not in (rt.ALLOW_CPU_ENV, "CUDA_VISIBLE_DEVICES")
    }
    env["OMP_NUM_THREADS"] = "1"
    commands = {name: [sys.executable, "-c", code] for name, code in scripts.items()}
    for name, (rc, stdout, stderr) in run_at_once(commands, env, timeout=240).items():
        assert rc == 2, (name, stderr)
        (line,) = stderr.strip().splitlines()
        assert line.startswith("error: an NVIDIA GPU is present"), (name, line)
        _check_message(line)
        assert stdout == "", (name, stdout)
    assert not out.exists() and not (tmp_path / "data").exists()  # nothing built or written
