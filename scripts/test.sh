#!/usr/bin/env bash
# Set up (if needed) and run every check: the import-linter contract, ruff,
# mypy --strict, then the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
export PATH="$PWD/.venv/bin:$PATH"
echo "== import-linter (the protocol core stays pure)"
lint-imports
echo "== ruff"
ruff check src tests
ruff format --check src tests benchmarks scripts
echo "== mypy --strict"
mypy
echo "== pytest"
set +e
python -m pytest "$@"
rc=$?
set -e
# The vLLM tier: the real vLLM 0.33.0 in its own environment (CPU torch, no
# CUDA packages). EMBEDLINK_TEST_VLLM=0 skips it, saying so.
if [ "${EMBEDLINK_TEST_VLLM:-1}" = 1 ]; then
  echo "== vLLM tier (tests/vllm in .venv-vllm)"
  scripts/setup_vllm.sh
  set +e
  VLLM_TARGET_DEVICE=cpu .venv-vllm/bin/python -m pytest tests/vllm "$@"
  vrc=$?
  set -e
  # a filter (-k) that matches nothing in this tier is no failure of it
  if [ "$rc" = 0 ] && [ "$vrc" != 5 ]; then rc=$vrc; fi
else
  echo "== vLLM tier skipped (EMBEDLINK_TEST_VLLM=0)"
fi
# The SGLang tier: the real SGLang 0.5.23 in its own environment (torch
# 2.14.1, which SGLang's imports need). EMBEDLINK_TEST_SGLANG=0 skips it.
if [ "${EMBEDLINK_TEST_SGLANG:-1}" = 1 ]; then
  echo "== SGLang tier (tests/sglang in .venv-sglang)"
  scripts/setup_sglang.sh
  set +e
  .venv-sglang/bin/python -m pytest tests/sglang "$@"
  src=$?
  set -e
  if [ "$rc" = 0 ] && [ "$src" != 5 ]; then rc=$src; fi
else
  echo "== SGLang tier skipped (EMBEDLINK_TEST_SGLANG=0)"
fi
exit "$rc"
