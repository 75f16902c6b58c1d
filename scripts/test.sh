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
exec python -m pytest "$@"
