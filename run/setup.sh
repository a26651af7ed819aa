#!/usr/bin/env bash
# Creates .venv with the pinned stack and builds the RoIAlign extension. Idempotent: a rerun
# with nothing changed takes seconds (a hash of the pins decides whether pip runs at all).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

stamp=.venv/.fgclip-setup-hash
want=$(cat run/requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  echo "[setup] installing pinned requirements (first time: ~2-3 min, torch comes from local disk)"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r run/requirements.txt
  .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
  echo "$want" > "$stamp"
else
  echo "[setup] .venv up to date"
fi

bash run/build_ext.sh
