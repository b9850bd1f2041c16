#!/usr/bin/env bash
# Set up (first run only) and run the demo: two brokers, two parties, generated data.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup.sh
exec .venv/bin/python -m harness.demo "$@"
