"""Preflight: everything this party can check on its own, before the handshake.

The spec and ``--party``; what the input and output paths are (a regular file, or for the
output absent; FIFOs, devices, sockets and folders are refused without being opened); the
output folder (created, writable); the input's content (UTF-8 text without NUL bytes or
over-long lines, header, key columns, no blank lines); the keys after the spec's
normalisation (values a step cannot parse or that become empty, refused or dropped as
``on_invalid`` says; duplicates after normalisation); this party's broker (its
HTTP PTP port answers and serves this party) and, with ``backend: ray``, the party's Ray head.
The cheap path checks come first, so a bad output is named before a large input is read.
A second run of a job still in progress for the same party and output is refused right after
the path checks (``joblock``). Every problem raises ``PreflightError``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import (
    broker_client,
    checkpoint,
    csv_io,
    data,
    database,
    normalize,
    parquet_io,
    rayhead,
    resources,
)
from .dbspec import DbConfig
from .errors import PreflightError, shown
from .spec import JobSpec

# set to 1: a plain CSV input goes to SPU as it is (see _presorted_for_spu)
PLAIN_AS_IS_ENV = "PSI_RUN_PLAIN_AS_IS"


def preflight(
    spec: JobSpec,
    party: str,
    take_lock: Callable[[], Path] | None = None,
    check_broker: bool = True,
) -> data.InputTable:
    """Run every local check; the inspected input.

    ``take_lock`` runs once the output (or work) folder exists and before the input is read,
    so a second run of a job that is in progress is refused at once (``joblock``); it returns
    the run's private work folder, where a database input is spooled."""
    if party not in spec.parties:
        raise PreflightError(
            f"--party {shown(party)} is not in the spec; the parties are {', '.join(spec.parties)}"
        )
    me = spec.parties[party]
    source, output = me.input, me.output
    if isinstance(source, Path) and not parquet_io.is_parquet(source):
        data.check_input_path(source)
    if isinstance(output, Path):
        data.check_output_location(output)
    else:
        where = f"output {output.describe()}"
        data.check_work_folder(me.local_folder, where)
        database.check_output(output, where)
    work = take_lock() if take_lock is not None else Path(tempfile.mkdtemp())
    plan = normalize.plan_for(spec, party)  # reads the salt file, if a step needs one
    allow = spec.allow_duplicate_keys
    if isinstance(source, DbConfig):
        inp = data.inspect_database(source, spec.keys, allow, plan, work / "input.parquet")
    elif parquet_io.is_parquet(source):
        inp = data.inspect_parquet(source, spec.keys, allow, plan)
    else:
        # the keys themselves are needed: a result built from the input's rows (SPU writes
        # CSV), or an unbalanced PSI (its cache and canonical keys)
        needed = not isinstance(output, Path) or parquet_io.is_parquet_output(output)
        needed = needed or spec.unbalanced is not None
        # a checkpointed job's input digest is taken from the bytes the check reads
        digest = checkpoint.content_hash() if checkpoint.supported(spec) else None
        inp = data.inspect_input(source, spec.keys, allow, plan, keys_needed=needed,
                                 digest=digest)  # fmt: skip
    if not isinstance(output, Path) or parquet_io.is_parquet_output(output):
        inp.plain = False  # SPU writes CSV: the result is built from the input's rows
    if inp.quoted and spec.api != "psi":
        inp.plain = False  # SPU's legacy psi_csv reader keeps a header name's quotes
    if inp.plain and _presorted_for_spu(spec, inp):
        inp.plain, inp.keys_in_file = False, True
    elif not inp.plain:
        inp.load_keys(spec.keys)  # when the preflight only hashed them
    if check_broker:  # not for a run without a peer (an unbalanced server's --offline)
        broker_client.check_broker(me.broker, party)
    if spec.backend == "ray":
        rayhead.check_head(party, me.ray_address)  # type: ignore[arg-type]
    return inp


def _presorted_for_spu(spec: JobSpec, inp: data.InputTable) -> bool:
    """Whether a plain CSV input goes to SPU as a canonical-key file in (nearly) key order
    rather than as it is: SPU 0.9.3b0 starts by sorting its whole input with GNU sort, which
    costs it more than the file costs psi-run (10M plain ids, a direct pair of bare SPU calls:
    25.0-25.1 s on such a file against 29.0-30.3 s on the user's file; writing it 1.5 s).
    The keys are read again batch by batch, never all held. One key column and an inner join
    on a single SPU call (``api: psi``), where the canonical-key path reads the result's keys
    back from SPU's output and copies the result's lines from the input.
    ``PSI_RUN_PLAIN_AS_IS=1`` keeps SPU reading such a file as it is (no copy of the keys in
    the work folder, e.g. when its disk is short); so does a file too large for the result
    copy to stay below SPU's own memory (``result_copy_fits``)."""
    return (
        os.environ.get(PLAIN_AS_IS_ENV, "") != "1"
        and isinstance(inp.source, csv_io.CsvSource)
        and result_copy_fits(inp.source.size, inp.rows)
        and inp.normalized is None
        and len(spec.keys) == 1
        and spec.join == "inner"
        and spec.api == "psi"
        and spec.shards == 1
        and spec.unbalanced is None
    )


def result_copy_fits(input_bytes: int, rows: int) -> bool:
    """Whether copying the result's lines from the input (``rawrows``: the input memory-mapped,
    its pages counted in this process's RSS as they are read, and 16 bytes a row of line
    starts and result rows) stays within SPU's own estimated peak (``resources``), so that
    the job's largest process is still SPU's: 10M rows of 22 bytes about 0.4 GB against 1.06
    GB; 100M rows 3.8 GB against 1.24 GB (measured: 3.4 GB), where SPU reads the file as it is."""
    return input_bytes + 16 * rows <= resources.spu_memory(rows)
