#!/usr/bin/env bash
# The main job on a CPU machine: set up .venv, then train the tiny FG-CLIP preset (both loss
# stages: global + regional/hard-negative) on the embedded synthetic fine-grained dataset, with
# tensor parallelism 1 in a single process. Logs rate/ETA, writes metrics.jsonl, loss.png and a
# checkpoint under runs/tiny_cpu/. Extra arguments are config overrides, e.g. train.steps=200.
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh
exec .venv/bin/python -m fgclip_mega.train --preset tiny train.output_dir=runs/tiny_cpu "$@"
