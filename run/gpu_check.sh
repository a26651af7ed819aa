#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see the device tool), at most 9 minutes with the
# wheel installs: builds the CUDA extension against that machine's torch, runs the GPU tests part
# by part (RoIAlign CUDA vs CPU, Triton losses pinned to one tile, the other GPU-marked tests, DALI
# mixed decode when DALI is there), bf16 training steps on an NCCL group of one (DDP overlap +
# distributed optimizer, activation checkpointing, SigLIP, eval, SDPA flash/cuDNN only, sync
# debug "error" over stage-2 steps), B/16 and L/14-336 at full depth, and the benchmarks. One
# JSON object per part (pass, seconds) in $OUT/gpu_check_<time>-<host>.jsonl (run/results/ when
# $OUT is unset); the parts, their time budgets and the global deadline live in run/gpu_check.py.
# Without a GPU: `python run/gpu_check.py --cpu-dry-run` runs each part's CPU stand-in.
#
# The device image has its own python3 (torch, triton, transformers) but no megatron-core or zarr:
# here, first run `bash run/gpu_wheels.sh` (fills .whl/, < 64 MiB), then call this script with
# carry [".whl"]; the wheels are installed into /tmp/fgclip_site as the check's first part.
#   device run:  bash run/gpu_check.sh            (timeout_s 600)
#   afterwards:  python run/gpu_check.py --collect <files_at>   (copies into run/results/)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The repo venv only when its torch sees a GPU (a cluster node set up by run/setup.sh).
if [[ -z "${PYTHON:-}" && -x .venv/bin/python ]] && command -v nvidia-smi >/dev/null &&
  .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PY=.venv/bin/python
fi
# The driver keeps its own 540 s deadline; this outer limit only guards against a stuck driver.
exec timeout -k 5 550 "$PY" run/gpu_check.py "$@"
