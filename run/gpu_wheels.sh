#!/usr/bin/env bash
# Downloads (here, where PyPI is reachable) the pure-Python / cp312 wheels that the device
# machine's image lacks, into .whl/ (git-ignored), for run/gpu_check.sh to install there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in megatron-core==0.16.1 zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 \
           google-crc32c==1.9.0 open-clip-torch==3.3.0 ftfy==6.3.1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d .whl "$pkg"
done
du -sh .whl
