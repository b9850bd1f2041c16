#!/usr/bin/env bash
# Set up (first run only), lint with the pinned ruff, and run the whole test suite:
# real brokers, real SPU PSI.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
