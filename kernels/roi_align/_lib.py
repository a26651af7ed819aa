# Loads the compiled fgclip::roi_align libraries built by `bash run/build_ext.sh`:
#   <dir>/libfgclip_roi_align_cpu.so   op schema + CPU kernels (required for any compiled use)
#   <dir>/libfgclip_roi_align_cuda.so  CUDA kernels (optional)
# <dir> is $FGCLIP_EXT_DIR if set, else build/lib under the repo root (two levels above this
# package). Loading never raises: failures are recorded and reported by status().
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

ENV_DIR = "FGCLIP_EXT_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
if (REPO_ROOT / "run" / "build_ext.sh").is_file():  # a source checkout
    BUILD_HINT = f"build it with `bash run/build_ext.sh` (in {REPO_ROOT})"
else:  # an installed wheel: no build/ beside the package, and no CMake sources either
    BUILD_HINT = (
        "the installed package carries no compiled kernels: in a source checkout run "
        f"`bash run/build_ext.sh` and set {ENV_DIR}=<checkout>/build/lib"
    )
CPU_LIB = "libfgclip_roi_align_cpu.so"
CUDA_LIB = "libfgclip_roi_align_cuda.so"


@dataclass(frozen=True)
class LibStatus:
    cpu: bool  # fgclip::roi_align has a CPU kernel
    cuda: bool  # ... and a CUDA kernel
    directory: Path
    errors: tuple[str, ...]  # why a library did not load


_lock = threading.Lock()
_status: LibStatus | None = None


def lib_dir() -> Path:
    env = os.environ.get(ENV_DIR)
    return Path(env) if env else REPO_ROOT / "build" / "lib"


def _has_kernel(key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fgclip::roi_align", key)
    except RuntimeError:  # op not registered at all
        return False


def _register_fakes() -> None:
    # Shape-only implementations so the op works with meta tensors and torch.compile.
    @torch.library.register_fake("fgclip::roi_align")
    def _(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned):
        return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))

    @torch.library.register_fake("fgclip::roi_align_backward")
    def _(grad, rois, scale, ph, pw, n, c, h, w, sampling_ratio, aligned, det, channels_last=False):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return grad.new_empty((n, c, h, w)).contiguous(memory_format=fmt)


def load() -> LibStatus:
    global _status
    if _status is not None:  # lock-free after the first call (and traceable by torch.compile)
        return _status
    with _lock:
        if _status is not None:
            return _status
        d = lib_dir()
        errors: list[str] = []
        for name, key in ((CPU_LIB, "CPU"), (CUDA_LIB, "CUDA")):
            if _has_kernel(key):  # already loaded (e.g. by another copy of this module)
                continue
            if key == "CUDA" and not _has_kernel("CPU"):
                break  # the CUDA library needs the schema defined by the CPU one
            path = d / name
            if not path.is_file():
                errors.append(f"{path} not found")
                continue
            try:
                torch.ops.load_library(str(path))
            except (OSError, RuntimeError) as e:
                errors.append(f"{path}: {e}")
        if _has_kernel("CPU"):
            try:
                _register_fakes()
            except RuntimeError as e:  # registered already by another loader instance
                if "already" not in str(e):
                    raise
        _status = LibStatus(_has_kernel("CPU"), _has_kernel("CUDA"), d, tuple(errors))
        return _status


def reset_for_tests() -> None:
    # Forget the cached status (libraries stay loaded: the dispatcher cannot unload them).
    global _status
    with _lock:
        _status = None
