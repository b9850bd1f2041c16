#!/usr/bin/env bash
# Re-resolve requirements.lock from requirements/base.in, requirements/dev.in and requirements/overrides.txt.
# Needs uv (pip install uv). The lock holds name==version lines only, no index addresses.
set -euo pipefail
cd "$(dirname "$0")/.."
uv pip compile requirements/base.in requirements/dev.in --overrides requirements/overrides.txt \
    --prerelease=if-necessary-or-explicit --python-version 3.11 \
    --python-platform x86_64-unknown-linux-gnu --no-header --no-annotate -o requirements.lock
