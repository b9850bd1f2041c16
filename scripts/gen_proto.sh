#!/usr/bin/env bash
# Regenerate the Python modules for broker/proto/*.proto (run after editing a .proto).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -m grpc_tools.protoc -Ibroker/proto --python_out=broker/proto \
    --grpc_python_out=broker/proto broker/proto/ptp.proto broker/proto/http_ptp.proto 2>/dev/null
rm -f broker/proto/http_ptp_pb2_grpc.py
sed -i 's/^import ptp_pb2 as/from . import ptp_pb2 as/' broker/proto/ptp_pb2_grpc.py
