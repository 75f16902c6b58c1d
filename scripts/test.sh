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
exit "$rc"
