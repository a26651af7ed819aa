#!/usr/bin/env bash
# Creates .venv with the pinned stack and builds the RoIAlign extension. Idempotent: a rerun
# with nothing changed takes seconds (a hash of the pins decides whether pip runs at all).
# Everything comes from PyPI: Python 3.11 or 3.12 ($PYTHON, else python3.11, else python3.12),
# and on a GPU machine without a CUDA toolkit the CUDA 13.0 compiler wheels
# (run/requirements-cuda.txt), so the CUDA RoIAlign is always built where a GPU is.
set -euo pipefail
cd "$(dirname "$0")/.."

usable() {  # a python interpreter of a supported version (pyenv shims may exist but not run)
  "$1" -c 'import sys; sys.exit(sys.version_info[:2] not in ((3, 11), (3, 12)))' 2>/dev/null
}
if [ ! -x .venv/bin/python ]; then
  PY=""
  for p in ${PYTHON:-} python3.11 python3.12; do
    if command -v "$p" >/dev/null 2>&1 && usable "$p"; then PY=$p; break; fi
  done
  if [ -z "$PY" ]; then
    echo "[setup] ERROR: need Python 3.11 or 3.12: none of '${PYTHON:-}' python3.11 python3.12 runs" \
      "(set PYTHON=/path/to/python3.x)" >&2
    exit 1
  fi
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
usable .venv/bin/python || {
  echo "[setup] ERROR: .venv has $(.venv/bin/python --version 2>&1); need 3.11 or 3.12 (rm -r .venv)" >&2
  exit 1
}

stamp=.venv/.fgclip-setup-hash
want=$(cat run/requirements.txt run/requirements-py312.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing pinned requirements (first time: ~2-3 min)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r run/requirements.txt \
    -r run/requirements-py312.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
else
  echo "[setup] .venv up to date"
fi

# A GPU and no CUDA compiler anywhere: take nvcc from PyPI rather than build the CPU op only.
if { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; } &&
  [ "${FGCLIP_WITH_CUDA:-1}" = 1 ] && ! bash run/build_ext.sh --find-cuda >/dev/null 2>&1; then
  echo "[setup] GPU present, no CUDA toolkit: installing nvcc 13.0 from PyPI (run/requirements-cuda.txt)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r run/requirements-cuda.txt
fi

bash run/build_ext.sh
