#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) exactly the cp312 wheels that the lent GPU machine's
# image lacks, into .whl/ (git-ignored), for run/gpu_check.py to install there (carry [".whl"]).
# That image (python 3.12) already has torch, triton, transformers, tokenizers, safetensors, timm,
# numpy, packaging, typing_extensions, pyyaml, regex, tqdm, psutil, pytest, pytest-timeout;
# nvidia-dali (~600 MB) cannot travel, so the DALI mixed-decode part is skipped there.
# Everything that travels (working tree + .whl) must stay under 64 MiB: checked at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=(
  megatron-core==0.16.1                              # model-parallel layers, DDP, optimizer
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0   # shards
  open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4  # tokenizer
)
plat=()
for n in 17 24 27 28; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
plat+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
rm -rf .whl  # one version of each package: two would stop the install there
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl "${WHEELS[@]}"
n=$(ls .whl/*.whl | wc -l)
[[ "$n" == "${#WHEELS[@]}" ]] || { echo "gpu_wheels: expected ${#WHEELS[@]} wheels, got $n" >&2; exit 1; }

# What travels: tracked + untracked-not-ignored files, plus .whl.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
whl=$(du -cb .whl/*.whl | tail -1 | cut -f1)
limit=$((64 * 1024 * 1024))
printf 'gpu_wheels: %d wheels, %.1f MiB; working tree %.1f MiB; total %.1f of 64 MiB\n' "$n" \
  "$(echo "$whl / 1048576" | bc -l)" "$(echo "$tree / 1048576" | bc -l)" \
  "$(echo "($whl + $tree) / 1048576" | bc -l)"
if ((whl + tree > limit)); then
  echo "gpu_wheels: over the 64 MiB a device call carries" >&2
  exit 1
fi
