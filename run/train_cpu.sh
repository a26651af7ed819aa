#!/usr/bin/env bash
# The main job on a CPU machine: set up .venv, then with 2 data-parallel processes (torchrun,
# gloo) train the tiny FG-CLIP preset in two stages (global, then regional from the stage-1
# checkpoint) and, at the same total budget, a global-only run; evaluate both on held-out
# synthetic scenes and write runs/main_job/report.md, summary.json and PNGs (run/main_job.py).
# Options: --recipe fgclip2 (FG-CLIP 2 on mixed-size scenes: runs/main_job_fgclip2), --name NAME,
# --data-seed N; extra key=value arguments are overrides for both runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh
exec .venv/bin/python run/main_job.py "$@"
