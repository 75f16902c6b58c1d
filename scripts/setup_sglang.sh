#!/usr/bin/env bash
# Create or refresh .venv-sglang: SGLang 0.5.23 (installed --no-deps) plus only
# the packages that SGLang's encoder-disaggregation (EPD) modules, its plugin
# framework, the Scheduler and the TokenizerManager need at import time, plus
# embedlink (editable), pytest, pytest-timeout and hypothesis.
#
# torch: SGLang's import chain needs torchvision at import time
# (sglang.srt.managers.schedule_batch -> sglang.srt.configs -> nano_nemotron_vl
# -> sglang.srt.multimodal.internvl_utils: `import torchvision.transforms`).
# PyPI's torchvision wheels are CUDA builds whose _C.so links libc10_cuda.so,
# so they fail on the local torch 2.13.0+cpu wheel ("operator torchvision::nms
# does not exist"; 0.28.0 and 0.29.x alike). So this venv uses SGLang's own
# pin, torch==2.14.1 (CUDA build; it imports and runs on CPU, no GPU needed)
# with torchvision==0.29.1 and the triton==3.8.0 that torch pins.
#
# Usage: scripts/setup_sglang.sh   (then: .venv-sglang/bin/python -m pytest tests/sglang)
# Measured on the 2-core CPU machine (another test suite running): a fresh run
# takes 89 s with a warm pip cache, 87 s with PIP_NO_CACHE_DIR=1 (torch and
# torchvision come from the local wheel index; the nvidia-* CUDA runtime wheels
# torch pulls come from PyPI); du -sh .venv-sglang: 6.0G.
# A second run is a no-op (under a second) until pyproject.toml or this script changes.
# See docs/research/sglang-0.5.23-epd.md.
set -euo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-sglang
# sglang 0.5.23 ships only a cp311 wheel (it has compiled Rust extensions).
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "error: SGLang 0.5.23 needs CPython 3.11 (set PYTHON=python3.11)" >&2; exit 1
fi
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # Debian's python3 ships venv separately.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  else
    echo "python3 venv support is missing: install python3-venv" >&2; exit 1
  fi
fi
stamp="$VENV/.embedlink-sglang-installed"
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ ! "$script" -nt "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
# Versions are SGLang 0.5.23's METADATA pins (Requires-Dist) where it pins;
# packages it leaves unpinned are left unpinned here. Each one below is a
# module-level import on the path of the modules checked at the end.
deps=(
  "torch==2.14.1" "torchvision==0.29.1"   # see the header; triton comes with torch
  numpy "pyzmq>=25.1.2" aiohttp fastapi "uvicorn>=0.51" uvloop orjson
  pydantic psutil requests pillow packaging pybase64 msgspec dill setproctitle
  IPython                      # sglang/utils.py imports it at module level
  "transformers==5.19.0" "tokenizers==0.23.2" "sentencepiece==0.2.1"
  "apache-tvm-ffi==0.1.11"     # provides tvm_ffi (sglang.kernels all_reduce)
  "compressed-tensors==0.18.0" gguf einops partial_json_parser "openai==2.8.0"
  # the test tools, at embedlink's [test] pins (tests/conftest.py imports hypothesis)
  "pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6.90"
  -e .
)
# pip warns that SGLang's other requirements (CUDA kernels, flashinfer, ...)
# are missing: that is expected, so the resolver's conflict report is dropped.
filter() { grep -vE "^(sglang) .* requires |dependency resolver|conflicts\.$|is ignored: it is neither" || true; }
"${pip[@]}" "${deps[@]}" 2>&1 | filter
"${pip[@]}" --no-deps "sglang==0.5.23" 2>&1 | filter
# The imports embedlink's SGLang plugin and its tests need.
if ! out=$("$VENV/bin/python" -c '
import sglang.srt.plugins
import sglang.srt.plugins.hook_registry
import sglang.srt.disaggregation.base.conn
import sglang.srt.managers.schedule_batch
import sglang.srt.disaggregation.encoder.receiver
import sglang.srt.disaggregation.encoder.server
import sglang.srt.disaggregation.encoder.runtime
import sglang.srt.disaggregation.encoder.http_server
import sglang.srt.distributed.parallel_state
import sglang.srt.runtime_context
import sglang.srt.server_args
import sglang.srt.managers.scheduler
import sglang.srt.managers.tokenizer_manager
import embedlink
' 2>&1); then
  echo "$out" >&2; echo "error: SGLang imports fail in $VENV" >&2; exit 1
fi
touch "$stamp"
