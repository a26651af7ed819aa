import os

import pytest

# Triton kernels run through the interpreter on machines without a GPU; this must be set before
# triton is imported anywhere in the test session.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    # GPU tests are not skipped silently: they are deselected here and counted in the summary,
    # and run/gpu_check.sh runs them (`pytest -m gpu`) on a machine with a GPU.
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]
        config._fgclip_gpu_deselected = len(gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    n = getattr(config, "_fgclip_gpu_deselected", 0)
    if n:
        terminalreporter.write_line(
            f"{n} GPU test(s) deselected: no CUDA device here; run run/gpu_check.sh on a GPU."
        )


@pytest.fixture(scope="module")
def world():
    """A world of one with megatron's groups (TP=1) in this process."""
    import torch.distributed as dist

    from fgclip_mega.config import ParallelConfig
    from fgclip_mega.parallel import destroy_parallel, init_parallel

    started_here = not dist.is_initialized()
    yield init_parallel(ParallelConfig(), seed=0)
    if started_here:
        destroy_parallel()


@pytest.fixture(scope="session")
def built_library():
    """The compiled RoIAlign library, built with run/build_ext.sh (quick when up to date)."""
    import subprocess
    from pathlib import Path

    from kernels.roi_align import _lib, load_library

    root = Path(__file__).resolve().parents[1]
    if not os.environ.get(_lib.ENV_DIR):  # an explicit library dir is used as is
        proc = subprocess.run(
            ["bash", str(root / "run" / "build_ext.sh")], capture_output=True, text=True
        )
        if proc.returncode != 0:
            pytest.fail(f"run/build_ext.sh failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    _lib.reset_for_tests()
    status = load_library()
    assert status.cpu, f"compiled RoIAlign CPU op did not load: {status.errors}"
    return status
