#!/usr/bin/env bash
# Start one party's Ray head for psi-run's `backend: ray`.
#
#   deploy/ray/start-ray-head.sh PARTY HOST:PORT [--num-cpus N] [--temp-dir DIR]
#                                [--object-store-memory BYTES] [--block]
#
# HOST:PORT is the party's `ray_address` in the job spec. Every port of the head is derived
# from PORT (PORT..PORT+8 for its services, PORT+100..PORT+199 for workers), so two heads on
# one host with ports 1000 apart never collide. The head carries the custom resource PARTY,
# which SecretFlow uses to place the party's tasks. Add machines to the party's cluster with
#   ray start --address=HOST:PORT --resources='{"PARTY": 1000}'
# (a worker machine needs the same psi-run checkout, and must reach the party's broker).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
party=$1 address=$2
shift 2
here="$(cd "$(dirname "$0")/../.." && pwd)"
python="$here/.venv/bin/python"
[[ -x "$python" ]] || { echo "start-ray-head: run scripts/setup.sh first ($python missing)" >&2; exit 2; }
cmd=$("$python" -m psi_runner.rayhead --party "$party" --address "$address" "$@")
echo "start-ray-head: $cmd"
export RAY_USAGE_STATS_ENABLED=0
eval "exec $cmd"
