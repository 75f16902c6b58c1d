#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) and install
# embedlink into it. Usage: scripts/setup.sh [extras], e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  # Debian's python3 ships venv separately.
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
  else
    echo "python3 venv support is missing: install python3-venv" >&2; exit 1
  fi
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
extras=${1:-}
# The Mooncake engine's native library needs libibverbs1, even for TCP.
if [ "$extras" = test ] && ! ldconfig -p 2>/dev/null | grep -q 'libibverbs.so.1 '; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get install -y -qq libibverbs1 >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq libibverbs1 >/dev/null; }) ||
      echo "warning: could not install libibverbs1; mooncake tests will fail" >&2
  else
    echo "warning: libibverbs1 is missing (apt-get install libibverbs1); mooncake tests will fail" >&2
  fi
fi
# iproute2 for the network-namespace tests, nftables for the lossy-link tests
# (random loss and the fault proxy's redirect)
if [ "$extras" = test ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=""
  command -v ip >/dev/null || missing="$missing iproute2"
  command -v nft >/dev/null || missing="$missing nftables"
  if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    apt-get install -y -qq $missing >/dev/null 2>&1 ||
      { apt-get update -qq && apt-get install -y -qq $missing >/dev/null 2>&1; } || true
  fi
fi
case "$extras" in
  "") spec="." ;;
  # examples: transformers and Pillow for the real-model demo and its test
  # (tests/integration/test_vlm_demo.py); it needs torch, so it goes with it
  test) if [ "${EMBEDLINK_TEST_TORCH:-1}" = 1 ]; then spec=".[test,mooncake,examples]"; else spec=".[test,mooncake]"; fi ;;
  *) spec=".[${extras}]" ;;
esac
stamp=".venv/.embedlink-installed-${extras:-base}"
# Reinstall only when the project's metadata (or this script) changed since the last install.
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  if [ "$extras" = test ] && [ "${EMBEDLINK_TEST_TORCH:-1}" = 1 ]; then
    # torch tensors are an accepted input: test that path with the CPU build
    # (this kind of machine keeps the 2.13.0 CPU wheel on disk; set
    # EMBEDLINK_TEST_TORCH=0 to skip it, and those tests skip visibly).
    # First, so that the examples extra's torch>=2.4 finds it installed
    # instead of resolving to the newest (CUDA) build.
    .venv/bin/python -c 'import torch' 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
  fi
  .venv/bin/python -m pip install -q -e "$spec"
  if [ "$extras" = test ]; then
    # NVIDIA NIXL for the nixl transport's tests, without its dependencies:
    # its metadata asks for torch, which pip would install as a ~3 GB CUDA
    # build; NIXL needs only numpy (docs/nixl.md). Not the nixl extra, which
    # keeps that dependency.
    .venv/bin/python -m pip install -q --no-deps nixl-cu12==1.5.1
  fi
  touch "$stamp"
fi
