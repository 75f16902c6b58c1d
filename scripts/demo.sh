#!/usr/bin/env bash
# Set up (if needed) and run `embedlink demo`; extra arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/embedlink demo "$@"
