"""A CSV input read as Arrow record batches: the key columns for the preflight, the rows of
the result later.

Arrow's streaming CSV reader parses the file block by block (``BLOCK`` bytes, on Arrow's
threads); only the key columns of each batch are kept (or, for a file that may go to SPU as
it is, only their hashes), so the preflight holds the keys at most, never the file. Every
column is still parsed (a row with the wrong number of fields is an error), and when the file
holds quotes, each batch's values are looked at once for what only quoting can put into a
field (a quote, comma, CR or LF), which decides whether SPU may read the file as it is. The
rest of a row is read again only to write the result (``CsvSource.take``), after the PSI,
batch by batch, keeping only the rows the result needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from . import distinct
from .arrowbits import int64_array
from .errors import OutputError, cut

# Bytes Arrow parses at a time: a row must fit in one (rows are at most 1 MiB, the scan's
# cap), and smaller blocks keep fewer bytes in flight (10M rows: 16 MB blocks 0.40 GB peak,
# 2 MB 0.26 GB, in the same time).
BLOCK = 2 << 20
_QUOTED_TEXT = (b'"', b",", b"\n", b"\r")  # what only quoting can put into a field


def open_batches(
    fh: BinaryIO | Path, header: list[str], include: list[str] | None = None
) -> pcsv.CSVStreamingReader:
    """A streaming reader of the data rows (the header line skipped; names from ``header``),
    every column as text; ``include``: the columns kept (all are parsed)."""
    return pcsv.open_csv(
        fh,
        read_options=pcsv.ReadOptions(column_names=header, skip_rows=1, block_size=BLOCK),
        parse_options=pcsv.ParseOptions(newlines_in_values=True),
        convert_options=pcsv.ConvertOptions(
            column_types={h: pa.string() for h in header},
            include_columns=include or [],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )


@dataclass
class KeyColumns:
    """The key columns of a CSV file (or, read with ``keep=False``, only a 64-bit hash of
    each key and the shortest key's length), and whether any value of any column holds a
    character that only quoting can put there (checked only when asked)."""

    table: pa.Table | None
    quoted_text: bool
    rows: int
    hashes: np.ndarray | None = None
    shortest: int = 0


def read_keys(
    fd: int,
    header: list[str],
    keys: tuple[str, ...],
    look_at_values: bool,
    keep: bool = True,
    expected_rows: int = 0,
) -> KeyColumns:
    """Read the file at ``fd`` (from its start) batch by batch; keep the ``keys`` columns, or
    with ``keep=False`` (one key column) only their hashes (8 bytes a row; ``expected_rows``
    sizes the array). ``look_at_values``: also look at every column's values for quoted text.
    Raises ``pa.ArrowInvalid`` for a malformed file."""
    os.lseek(fd, 0, os.SEEK_SET)
    kept: dict[str, list[pa.Array]] = {k: [] for k in keys}
    hashes = np.empty(expected_rows if not keep else 0, dtype=np.uint64)
    extra: list[np.ndarray] = []  # hashes past ``expected_rows``
    rows, shortest, quoted_text = 0, 1 << 62, False
    with os.fdopen(os.dup(fd), "rb", buffering=0) as fh:
        reader = open_batches(fh, header, None if look_at_values else list(dict.fromkeys(keys)))
        for batch in reader:
            if look_at_values and not quoted_text:
                quoted_text = any(_holds_quoted_text(c) for c in batch.columns)
            if keep:
                for k in keys:
                    kept[k].append(batch.column(k))
            elif batch.num_rows:
                column = batch.column(keys[0])
                shortest = min(shortest, _shortest(column))
                got = distinct.value_hashes(column)
                if rows + len(got) <= len(hashes) and not extra:
                    hashes[rows : rows + len(got)] = got
                else:
                    extra.append(got)
            rows += batch.num_rows
    if not keep:
        filled = hashes[: rows - sum(len(e) for e in extra)]
        all_hashes = np.concatenate([filled, *extra]) if extra else filled
        return KeyColumns(None, quoted_text, rows, all_hashes, shortest)
    table = pa.table({k: pa.chunked_array(v, pa.string()) for k, v in kept.items()})
    return KeyColumns(table, quoted_text, table.num_rows)


def read_key_table(path: Path, header: list[str], keys: tuple[str, ...]) -> pa.Table:
    """The key columns of a CSV file already checked by the preflight, read again."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        got = read_keys(fd, header, keys, look_at_values=False)
    finally:
        os.close(fd)
    assert got.table is not None
    return got.table


def _shortest(arr: pa.Array) -> int:
    end = arr.offset + len(arr) + 1
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : end]
    return int(np.diff(offsets).min())


def _holds_quoted_text(arr: pa.Array) -> bool:
    """Whether a value of the string array holds a quote, comma, CR or LF (its bytes, once)."""
    if not len(arr):
        return False
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    raw = arr.buffers()[2]
    if raw is None or offsets[-1] == offsets[0]:
        return False
    text = memoryview(raw)[int(offsets[0]) : int(offsets[-1])].tobytes()
    return any(c in text for c in _QUOTED_TEXT)


@dataclass
class CsvSource:
    """A CSV input whose rows are read again, batch by batch, to write the result; its size
    and modification time when the preflight read it (a file changed since is refused)."""

    path: Path
    header: list[str]
    size: int
    mtime_ns: int
    digest: str | None = None  # the file's checkpoint digest, when the preflight took it

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows at ``rows`` (data row numbers, in that order; -1: a row of NULLs), every
        column as text. Only the result's rows are kept while the file is read. OutputError
        when the file changed since the preflight (its rows may have moved)."""
        self.unchanged()
        missing = rows < 0
        wanted = np.where(missing, np.iinfo(np.int64).max, rows)
        order = np.argsort(wanted, kind="stable")
        ordered = wanted[order]
        schema = pa.schema([(h, pa.string()) for h in self.header])
        pieces = []
        start = 0
        with open(self.path, "rb") as fh:
            for batch in open_batches(fh, self.header):
                n = batch.num_rows
                lo, hi = np.searchsorted(ordered, [start, start + n])
                if hi > lo:
                    index = ordered[lo:hi] - start
                    pieces.append(pa.Table.from_batches([batch.take(int64_array(index))]))
                start += n
        self.unchanged()
        got = pa.concat_tables(pieces) if pieces else schema.empty_table()
        nulls = int(missing.sum())
        if nulls:
            empty = pa.table({h: pa.nulls(nulls, pa.string()) for h in self.header}, schema=schema)
            got = pa.concat_tables([got, empty])
        # got[j] is the row for order[j]: put every row back where ``rows`` asked for it.
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[order] = np.arange(len(rows), dtype=np.int64)
        return got.take(int64_array(inverse))

    def unchanged(self) -> None:
        """OutputError when the file changed since the preflight read it."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise OutputError(
                f"input {cut(str(self.path), 100)}: cannot read it again to write the result "
                f"({exc.strerror}); no result was written"
            ) from None
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            raise OutputError(
                f"input {cut(str(self.path), 100)}: changed while the job ran, so the result "
                "rows cannot be taken from it; no result was written, run the job again"
            )
