#!/usr/bin/env bash
# Set up (first run only) and run the whole test suite: real brokers, real SPU PSI.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
