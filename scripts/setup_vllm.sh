#!/usr/bin/env bash
# Create or refresh .venv-vllm: vLLM 0.33.0 (installed --no-deps) on the CPU
# build of torch 2.13.0, plus only the pure-Python packages that vLLM's EC
# connector, Scheduler and config modules need at import time (CPU-only, no
# torchvision, no triton), plus embedlink (editable), pytest, pytest-timeout
# and hypothesis.
# Usage: scripts/setup_vllm.sh   (then: VLLM_TARGET_DEVICE=cpu .venv-vllm/bin/python -m pytest tests/vllm)
# Measured on the 2-core CPU machine (another test suite running): a fresh run
# takes 85 s with a warm pip cache, 94 s with PIP_NO_CACHE_DIR=1 (vLLM's 336 MB
# wheel from PyPI, torch from the local wheel); du -sh .venv-vllm: 2.2G.
# A second run is a no-op (under a second) until pyproject.toml or this script changes.
# See docs/research/vllm-0.33-ec-connector.md (section 8 and the appendix).
set -euo pipefail
script="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # Debian's python3 ships venv separately.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  else
    echo "python3 venv support is missing: install python3-venv" >&2; exit 1
  fi
fi
stamp="$VENV/.embedlink-vllm-installed"
if [ -f "$stamp" ] && [ ! pyproject.toml -nt "$stamp" ] && [ ! "$script" -nt "$stamp" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q)
# Versions are vLLM 0.33.0's METADATA pins (Requires-Dist), except torch: vLLM
# asks for 2.14.0 (CUDA); 2.13.0 resolves to the local +cpu wheel on this kind
# of machine and is enough to import and build a real Scheduler. Packages that
# are not pinned in the METADATA are left unpinned, as vLLM leaves them.
deps=(
  "torch==2.13.0"
  packaging psutil "pyzmq>=25.0.0" regex numpy "pydantic>=2.12.0" cbor2
  "transformers<5.21.0,>=5.16.1" "tokenizers>=0.23.2" "huggingface_hub>=1.31.0"
  "safetensors>=0.6.2" "aiohttp>=3.14.4" "requests>=2.33.0"
  "oss-harmony>=0.0.11"  # provides openai_harmony (not the openai-harmony package)
  "openai>=2.25.0" "pillow>=13.0.0" pybase64 cachetools msgspec cloudpickle
  py-cpuinfo "prometheus_client>=0.18.0" "fastapi[standard]<0.137.0,>=0.133.0"
  partial-json-parser "llguidance<1.8.0,>=1.7.0"
  "apache-tvm-ffi==0.1.11"  # xgrammar's runtime dependency, at vLLM's pin
  einops  # the model-registry inspection subprocess imports it (Qwen2-Audio)
  # the Mooncake engine, for the mooncake rows of the vLLM bench (its own
  # ECMooncakeConnector and embedlink's mooncake transport); needs libibverbs1,
  # which scripts/setup.sh installs
  "mooncake-transfer-engine-non-cuda>=0.3.13; sys_platform == 'linux' and platform_machine == 'x86_64'"
  # the test tools, at embedlink's [test] pins (tests/conftest.py imports hypothesis)
  "pytest>=8" "pytest-timeout>=2.2" "hypothesis>=6.90"
  -e .
)
# pip warns that vLLM's other requirements (CUDA kernels, torchvision, ...) are
# missing: that is expected, so the resolver's conflict report is dropped.
filter() { grep -vE "^(vllm|xgrammar) .* requires |dependency resolver|conflicts\.$|is ignored: it is neither" || true; }
"${pip[@]}" "${deps[@]}" 2>&1 | filter
# xgrammar==0.2.8 (vLLM's pin) without its deps: they would pull triton, and
# torch is already here.
"${pip[@]}" --no-deps "xgrammar==0.2.8" "vllm==0.33.0" 2>&1 | filter
torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
case "$torch_version" in
  *+cpu) ;;
  *) echo "warning: $VENV has torch $torch_version, not the CPU build" >&2 ;;
esac
# The imports embedlink's vLLM connector and its tests need.
if ! out=$(VLLM_TARGET_DEVICE=cpu "$VENV/bin/python" -c '
import vllm.config
import vllm.distributed.ec_transfer.ec_connector.base
import vllm.distributed.ec_transfer.ec_connector.example_connector
import vllm.distributed.ec_transfer.ec_connector.factory
import vllm.distributed.ec_transfer.ec_connector.mooncake_ec_connector
import vllm.v1.core.sched.scheduler
import vllm.v1.worker.ec_connector_model_runner_mixin
import vllm.v1.worker.gpu.ec_connector
import embedlink
' 2>&1); then
  echo "$out" >&2; echo "error: vLLM imports fail in $VENV" >&2; exit 1
fi
touch "$stamp"
