#!/usr/bin/env bash
# Create .venv/ and install the exact locked dependency set plus psi-run itself.
# Idempotent: re-installs only when requirements.lock or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
    for cand in "${PYTHON:-}" python3.11 python3.10 python3; do
        [ -n "$cand" ] || continue
        command -v "$cand" >/dev/null 2>&1 || continue
        if "$cand" -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 10), (3, 11)) else 1)'; then
            echo "$cand"; return 0
        fi
    done
    return 1
}

stamp_of() { cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1; }

if [ -x .venv/bin/python ] && [ -f .venv/.psi-run-stamp ] && [ "$(cat .venv/.psi-run-stamp)" = "$(stamp_of)" ]; then
    exit 0
fi
py=$(pick_python) || { echo "setup: Python 3.10 or 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $py" >&2
    "$py" -m venv .venv
fi
echo "setup: installing the locked dependencies (first time: a few minutes, about 1.8 GB)" >&2
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
.venv/bin/python -c 'import spu.psi, secretflow, ray, fed, grpc, aiohttp' \
    || { echo "setup: the installed environment does not import; delete .venv and retry" >&2; exit 1; }
stamp_of > .venv/.psi-run-stamp
echo "setup: ready (.venv/bin/psi-run, .venv/bin/psi-broker)" >&2
