#!/usr/bin/env bash
# The GPU device check in one command, on the device machine (its python3
# holds CUDA torch): unpack the carried Debian libraries under /tmp (never
# over /), install the carried wheels under /tmp/site, then tests/gpu and
# benchmarks/gpu_check.py (which writes gpu_check.json into $OUT).
# Prepared by benchmarks/device/fetch.sh; carry .whl and .debs.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p /tmp/debs "$OUT"
for f in .debs/*.deb; do dpkg -x "$f" /tmp/debs; done
export LD_LIBRARY_PATH=/tmp/debs/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi -L
nproc
python3 -c 'import torch, zmq, msgspec; print("torch", torch.__version__, "cuda", torch.version.cuda)'
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -5 | tee "$OUT/pytest_gpu.log"
# the Mooncake engine's glog lines are noise here
timeout 420 python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | grep -v '^[IWE][0-9]' | tee "$OUT/gpu_check.log"
