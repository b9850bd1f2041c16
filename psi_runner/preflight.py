"""Preflight: everything this party can check on its own, before the handshake.

The spec and ``--party``, the input file (exists, UTF-8, header, key columns, no blank lines,
duplicates), the output location, this party's broker (answers and serves this party) and,
with ``backend: ray``, the party's Ray head. Every problem raises ``PreflightError``.
"""

from __future__ import annotations

from . import broker_client, data, rayhead
from .errors import PreflightError
from .spec import JobSpec


def preflight(spec: JobSpec, party: str) -> data.InputTable:
    """Run every local check; the inspected input."""
    if party not in spec.parties:
        raise PreflightError(
            f"--party {party!r} is not in the spec; the parties are {', '.join(spec.parties)}"
        )
    me = spec.parties[party]
    inp = data.inspect_input(me.input, spec.keys, spec.allow_duplicate_keys)
    data.check_output_location(me.output)
    broker_client.check_broker(me.broker, party)
    if spec.backend == "ray":
        rayhead.check_head(party, me.ray_address)  # type: ignore[arg-type]
    return inp
