#!/usr/bin/env bash
# Sets everything up, then runs lint, format check and the whole test suite (slow tests too).
# GPU tests are deselected on machines without CUDA (run/gpu_check.sh runs them on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh
echo "[test] ruff check"
.venv/bin/ruff check .
echo "[test] ruff format --check"
.venv/bin/ruff format --check .
echo "[test] pytest"
exec .venv/bin/python -m pytest -q --durations=25 "$@"
