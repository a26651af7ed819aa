#!/usr/bin/env bash
# Builds the native kernels (top-level CMakeLists.txt) into build/ at the repo root.
# Idempotent: configures only when build/ is new or the configure arguments changed, then lets
# ninja rebuild what is out of date (a no-op run takes well under a second).
#
#   bash run/build_ext.sh              build (CPU op always, CUDA op when a toolkit is found)
#   bash run/build_ext.sh --find-cuda  print the CUDA toolkit root that would be used; exit 1 if none
#
# Where the CUDA compiler is looked for, first hit wins (a root needs bin/nvcc and
# include/cuda_runtime.h):
#   1. $CUDA_HOME, $CUDA_PATH
#   2. $FGCLIP_CUDA_SEARCH (default: /usr/local/cuda /usr/local/cuda-*, newest first)
#   3. `nvcc` on PATH (its real location's parent; a wrapper script without headers is skipped)
#   4. the PyPI toolkit in the python's site-packages: nvidia/cu13 (nvidia-cuda-nvcc 13.x,
#      run/requirements-cuda.txt) or nvidia/cuda_nvcc (CUDA 12 wheels)
# On a machine with a GPU (nvidia-smi or /proc/driver/nvidia lists one) a build without the CUDA op
# is an error: training would otherwise silently fall back to the slow PyTorch RoIAlign.
#
# Environment:
#   FGCLIP_PYTHON      python with torch (default: .venv/bin/python)
#   FGCLIP_BUILD_DIR   build directory (default: build/)
#   FGCLIP_WITH_CUDA   1 (default): build CUDA kernels (required when a GPU is present);
#                      0: CPU only, on purpose, even on a GPU machine
#   FGCLIP_CUDA_ARCHS  CUDA architectures in CMake syntax (default 90)
#   FGCLIP_CUDA_SEARCH system toolkit roots to try (globs allowed)
#   CUDA_HOME          CUDA toolkit root
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${FGCLIP_PYTHON:-$ROOT/.venv/bin/python}"
BUILD="${FGCLIP_BUILD_DIR:-$ROOT/build}"
WITH_CUDA="${FGCLIP_WITH_CUDA:-1}"
ARCHS="${FGCLIP_CUDA_ARCHS:-90}"
SEARCH="${FGCLIP_CUDA_SEARCH-/usr/local/cuda /usr/local/cuda-*}"
MODE=build
case "${1:-}" in
  "") ;;
  --find-cuda) MODE=find ;;
  *) echo "build_ext: unknown argument '$1' (expected nothing or --find-cuda)" >&2; exit 2 ;;
esac
[[ -x "$PY" ]] || { echo "build_ext: no python at $PY (set FGCLIP_PYTHON)" >&2; exit 1; }

is_root() { [[ -n "$1" && -x "$1/bin/nvcc" && -f "$1/include/cuda_runtime.h" ]]; }

# The real toolkit root: `nvcc` on PATH may be a wrapper script, from which CMake and torch
# would guess the wrong root.
first_root() {  # the first argument that is a toolkit root, physical path
  local c
  for c in "$@"; do
    if is_root "$c"; then (cd "$c" && pwd -P); return 0; fi
  done
  return 1
}

# The real toolkit root: `nvcc` on PATH may be a wrapper script, from which CMake and torch
# would guess the wrong root.
find_cuda() {
  local nvcc
  # Unquoted on purpose: the search list holds globs; sort -rV puts cuda-13.0 before cuda-12.8.
  # shellcheck disable=SC2086
  first_root "${CUDA_HOME:-}" "${CUDA_PATH:-}" $(ls -d $SEARCH 2>/dev/null | sort -rV) && return 0
  if nvcc="$(command -v nvcc 2>/dev/null)"; then
    first_root "$(dirname "$(dirname "$(readlink -f "$nvcc")")")" && return 0
  fi
  # PyPI's toolkit wheels unpack a full bin/include/lib/nvvm tree under site-packages.
  local -a pip_roots
  mapfile -t pip_roots < <("$PY" - <<'PYEOF'
import os, site, sys, sysconfig
dirs = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")] + site.getsitepackages() + sys.path
for d in dict.fromkeys(p for p in dirs if p):
    for sub in ("nvidia/cu13", "nvidia/cuda_nvcc"):
        print(os.path.join(d, sub))
PYEOF
  )
  first_root "${pip_roots[@]}"
}

# A GPU on this machine, in words ('' when none). No torch import (seconds): a CUDA GPU needs the
# NVIDIA kernel driver, which lists its GPUs under /proc/driver/nvidia/gpus.
gpu_present() {
  local line
  if command -v nvidia-smi >/dev/null 2>&1 && line="$(nvidia-smi -L 2>/dev/null | grep -m1 '^GPU ')"; then
    echo "$line (nvidia-smi)"
    return 0
  fi
  if compgen -G "/proc/driver/nvidia/gpus/*" >/dev/null; then
    echo "$(ls /proc/driver/nvidia/gpus | wc -l) GPU(s) in /proc/driver/nvidia/gpus"
    return 0
  fi
  return 1
}

CUDA_ROOT=""
CMAKE_CUDA_ROOT=""
if [[ "$WITH_CUDA" == "1" ]]; then
  CUDA_ROOT="$(find_cuda || true)"
fi
if [[ "$MODE" == "find" ]]; then
  [[ -n "$CUDA_ROOT" ]] || { echo "build_ext: no CUDA toolkit found" >&2; exit 1; }
  echo "$CUDA_ROOT"
  exit 0
fi

GPU=""
if [[ "$WITH_CUDA" == "1" ]]; then
  GPU="$(gpu_present || true)"
  if [[ -n "$GPU" && -z "$CUDA_ROOT" ]]; then
    cat >&2 <<EOF
build_ext: ERROR: this machine has a GPU ($GPU) but no CUDA compiler was found, so only the
CPU RoIAlign could be built and training would run the slow PyTorch fallback. Searched:
CUDA_HOME='${CUDA_HOME:-}', CUDA_PATH='${CUDA_PATH:-}', '$SEARCH', nvcc on PATH, and
nvidia/cu13 or nvidia/cuda_nvcc in the site-packages of $PY. Fix one of:
  $PY -m pip install -r $ROOT/run/requirements-cuda.txt   # nvcc 13.0 from PyPI (what setup.sh does)
  export CUDA_HOME=/path/to/cuda                           # a system toolkit
  FGCLIP_WITH_CUDA=0 bash run/build_ext.sh                 # CPU op only, on purpose
EOF
    exit 1
  fi
fi

tool() {  # prefer the python's own PyPI cmake/ninja (system cmake 3.25 cannot do CUDA C++20)
  local bindir
  bindir="$(dirname "$PY")"
  if [[ -x "$bindir/$1" ]]; then echo "$bindir/$1"; else command -v "$1"; fi
}
CMAKE="$(tool cmake)"
NINJA="$(tool ninja)"

# PyPI's toolkit wheels ship <root>/lib with only the versioned libcudart.so.13, while nvcc.profile
# links from <root>/lib64 and CMake's and torch's FindCUDA look for libcudart.so: point CMake at a
# shim root in the build directory (links only; the installed packages stay untouched).
cmake_cuda_root() {
  local root="$1" shim="$BUILD/cuda-root"
  if [[ -e "$root/lib64/libcudart.so" || ! -d "$root/lib" ]]; then
    echo "$root"
    return
  fi
  echo "$shim"
}

make_shim() {  # make_shim ROOT SHIM
  local root="$1" shim="$2" cudart f
  cudart="$(cd "$root/lib" && ls libcudart.so* 2>/dev/null | sort -V | tail -1 || true)"
  rm -rf "$shim"
  mkdir -p "$shim/lib"
  for f in bin include nvvm; do [[ -e "$root/$f" ]] && ln -s "$root/$f" "$shim/$f"; done
  for f in "$root"/lib/*; do ln -s "$f" "$shim/lib/"; done
  if [[ -n "$cudart" && ! -e "$shim/lib/libcudart.so" ]]; then
    ln -s "$root/lib/$cudart" "$shim/lib/libcudart.so"
  fi
  ln -s lib "$shim/lib64"
}

ARGS=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA" -DCMAKE_BUILD_TYPE=Release -DFGCLIP_PYTHON="$PY")
if [[ -n "$CUDA_ROOT" ]]; then
  echo "build_ext: CUDA toolkit at $CUDA_ROOT"
  CMAKE_CUDA_ROOT="$(cmake_cuda_root "$CUDA_ROOT")"
  ARGS+=(-DFGCLIP_WITH_CUDA=ON -DFGCLIP_CUDA_ARCHS="$ARCHS"
    -DCUDA_TOOLKIT_ROOT_DIR="$CMAKE_CUDA_ROOT" -DCUDAToolkit_ROOT="$CMAKE_CUDA_ROOT"
    -DCMAKE_CUDA_COMPILER="$CMAKE_CUDA_ROOT/bin/nvcc")
  # nvcc finds its libraries from its real location, where the wheels have no lib64.
  [[ "$CMAKE_CUDA_ROOT" != "$CUDA_ROOT" ]] && ARGS+=(-DCMAKE_CUDA_FLAGS="-L$CMAKE_CUDA_ROOT/lib64")
else
  if [[ "$WITH_CUDA" == "1" ]]; then
    echo "build_ext: no CUDA toolkit and no GPU: building the CPU op only"
  fi
  ARGS+=(-DFGCLIP_WITH_CUDA=OFF)
fi

mkdir -p "$BUILD"
# Serialise concurrent builds (e.g. two test sessions) of the same directory.
if command -v flock >/dev/null; then
  exec 9>"$BUILD/.build_ext.lock"
  flock 9
fi
if [[ -n "$CUDA_ROOT" && "$CMAKE_CUDA_ROOT" != "$CUDA_ROOT" ]]; then
  make_shim "$CUDA_ROOT" "$CMAKE_CUDA_ROOT"
fi
STAMP="$BUILD/.fgclip_configure_args"
if [[ ! -f "$BUILD/build.ninja" || ! -f "$STAMP" || "$(cat "$STAMP")" != "${ARGS[*]}" ]]; then
  rm -f "$BUILD/CMakeCache.txt"  # a changed generator or compiler cannot reuse the cache
  "$CMAKE" -S "$ROOT" -B "$BUILD" "${ARGS[@]}"
  printf '%s' "${ARGS[*]}" >"$STAMP"
fi
"$CMAKE" --build "$BUILD"
ls "$BUILD"/lib/libfgclip_*.so
# CMake can still drop the CUDA op (a torch without CUDA, a compiler CMake rejects): on a GPU
# machine that is the silent fallback this script exists to prevent.
if [[ -n "$GPU" && ! -f "$BUILD/lib/libfgclip_roi_align_cuda.so" ]]; then
  echo "build_ext: ERROR: GPU present ($GPU) but $BUILD/lib/libfgclip_roi_align_cuda.so was" \
    "not built; see the CMake output above (is $PY's torch a CUDA build?)" >&2
  exit 1
fi
