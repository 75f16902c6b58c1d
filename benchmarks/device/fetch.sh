#!/usr/bin/env bash
# Fetch, on a machine with the package registries, what the GPU device check
# needs and the device machine lacks (it reaches no registry): embedlink's
# compiled dependencies for the device's Python (3.12), the Mooncake engine's
# CUDA 13 build (torch there is +cu130) and Debian's libibverbs1, libnuma1
# and ibverbs-providers, which that engine loads. Into .whl/ and .debs/
# (both ignored by git; about 50 MB, under the device's 64 MiB for what
# travels). Then: benchmarks/device/run.sh on the device (carry .whl, .debs).
set -euo pipefail
cd "$(dirname "$0")/../.."
for d in .whl .debs; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
  mkdir -p "$d"
done
plat=""
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
  manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  plat="$plat --platform $p"
done
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp $plat -d .whl msgspec pyzmq mooncake-transfer-engine-cuda13
(cd .debs && apt-get download libibverbs1 libnuma1 ibverbs-providers)
du -sh .whl .debs
