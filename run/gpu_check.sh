#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see the device tool): builds the CUDA
# extension, runs the GPU tests, then every benchmark, in a few minutes. Results go to $OUT
# (set by the device tool; run/out/gpu otherwise): env.json, build.log, pytest_gpu.log,
# bench.jsonl and the benchmark plots.
#
# The device image has its own python3 with torch/triton/transformers but no megatron-core,
# zarr or open_clip: run/gpu_wheels.sh (here, before the call) downloads those as wheels into
# .whl/, which the call carries (carry: [".whl"]). nvidia-dali is too large to carry (600 MB), so
# the DALI `mixed` decode path is exercised only where DALI is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-run/out/gpu}
mkdir -p "$OUT"
PY=$(command -v "${PYTHON:-python3}")
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY=.venv/bin/python
fi
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
status=0

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt" || status=1
$PY -m fgclip_mega.env --json > "$OUT/env.json" 2>/dev/null; cat "$OUT/env.json"

echo "== build (CUDA)"
FGCLIP_PYTHON=$PY timeout 300 bash run/build_ext.sh > "$OUT/build.log" 2>&1 || { status=1; tail -30 "$OUT/build.log"; }

echo "== GPU tests"
timeout 300 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest_gpu.log" | tail -30
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== benchmarks"
for bench in run/bench_roi_align.py run/bench_loss.py run/bench_data.py; do
  [ -f "$bench" ] || continue
  name=$(basename "$bench" .py)
  timeout 240 $PY "$bench" --plot "$OUT/$name.png" 2>>"$OUT/bench_stderr.log" | tee -a "$OUT/bench.jsonl" \
    || { status=1; echo "{\"name\": \"$name\", \"error\": \"failed, see bench_stderr.log\"}" | tee -a "$OUT/bench.jsonl"; }
done
exit $status
