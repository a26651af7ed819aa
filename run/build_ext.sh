#!/usr/bin/env bash
# Builds the native kernels (top-level CMakeLists.txt) into build/ at the repo root.
# Idempotent: configures only when build/ is new or the configure arguments changed, then lets
# ninja rebuild what is out of date (a no-op run takes well under a second).
#
# Environment:
#   FGCLIP_PYTHON      python with torch (default: .venv/bin/python)
#   FGCLIP_BUILD_DIR   build directory (default: build/)
#   FGCLIP_WITH_CUDA   1 (default): build CUDA kernels if a toolkit is found; 0: CPU only
#   FGCLIP_CUDA_ARCHS  CUDA architectures in CMake syntax (default 90)
#   CUDA_HOME          CUDA toolkit root (default: searched under /usr/local)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${FGCLIP_PYTHON:-$ROOT/.venv/bin/python}"
BUILD="${FGCLIP_BUILD_DIR:-$ROOT/build}"
WITH_CUDA="${FGCLIP_WITH_CUDA:-1}"
ARCHS="${FGCLIP_CUDA_ARCHS:-90}"

tool() {  # prefer the venv's PyPI cmake/ninja (system cmake 3.25 cannot do CUDA C++20)
  if [[ -x "$ROOT/.venv/bin/$1" ]]; then echo "$ROOT/.venv/bin/$1"; else command -v "$1"; fi
}
CMAKE="$(tool cmake)"
NINJA="$(tool ninja)"
[[ -x "$PY" ]] || { echo "build_ext: no python at $PY (set FGCLIP_PYTHON)" >&2; exit 1; }

# The real toolkit root: `nvcc` on PATH may be a wrapper script, from which CMake and torch
# would guess the wrong root.
find_cuda() {
  local c
  for c in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV); do
    if [[ -n "$c" && -x "$c/bin/nvcc" && -f "$c/include/cuda_runtime.h" ]]; then
      (cd "$c" && pwd -P)
      return 0
    fi
  done
  return 1
}

ARGS=(-G Ninja -DCMAKE_MAKE_PROGRAM="$NINJA" -DCMAKE_BUILD_TYPE=Release -DFGCLIP_PYTHON="$PY")
if [[ "$WITH_CUDA" == "1" ]] && CUDA_ROOT="$(find_cuda)"; then
  ARGS+=(-DFGCLIP_WITH_CUDA=ON -DFGCLIP_CUDA_ARCHS="$ARCHS"
    -DCUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT" -DCUDAToolkit_ROOT="$CUDA_ROOT"
    -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc")
else
  ARGS+=(-DFGCLIP_WITH_CUDA=OFF)
fi

mkdir -p "$BUILD"
# Serialise concurrent builds (e.g. two test sessions) of the same directory.
if command -v flock >/dev/null; then
  exec 9>"$BUILD/.build_ext.lock"
  flock 9
fi
STAMP="$BUILD/.fgclip_configure_args"
if [[ ! -f "$BUILD/build.ninja" || ! -f "$STAMP" || "$(cat "$STAMP")" != "${ARGS[*]}" ]]; then
  rm -f "$BUILD/CMakeCache.txt"  # a changed generator or compiler cannot reuse the cache
  "$CMAKE" -S "$ROOT" -B "$BUILD" "${ARGS[@]}"
  printf '%s' "${ARGS[*]}" >"$STAMP"
fi
"$CMAKE" --build "$BUILD"
ls "$BUILD"/lib/libfgclip_*.so
