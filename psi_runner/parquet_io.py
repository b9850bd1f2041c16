"""Parquet inputs and outputs, streamed by row group.

An input is Parquet when its path ends in ``.parquet`` or ``.pq``, or is a folder holding such
files (every ``*.parquet`` / ``*.pq`` file in it, in name order, one table; files starting
with ``.`` or ``_`` are skipped, as Spark and Hive write them). Preflight reads it one row
group at a time and keeps only the key columns (as text: SPU compares text), so memory holds
the keys plus one row group; the other columns are read again, row group by row group, only to
write the result.

Checked, naming the file and row group: the files are Parquet and share one schema, every key
column exists and is text or a whole number, and no key is NULL (NULL matches nothing in SQL,
and SPU has no way to say it). Duplicates and normalisation follow the CSV rules (``data``).

An output is Parquet when its path ends in ``.parquet`` or ``.pq``: the result's columns keep
the input's Parquet types (a CSV input's columns are text), and a join's rows that only the
peer has are NULL in every column.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import PreflightError, cut, shown
from .specfile import file_kind

log = logging.getLogger("psi_runner.parquet_io")

SUFFIXES = (".parquet", ".pq")
_PATH_SHOWN = 100


def is_parquet(path: Path) -> bool:
    """Whether the input ``path`` names Parquet data: by its suffix, or a folder that holds
    Parquet files (any other folder is refused as a CSV input is)."""
    if path.suffix.lower() in SUFFIXES:
        return True
    try:
        return path.is_dir() and any(p.suffix.lower() in SUFFIXES for p in path.iterdir())
    except OSError:
        return False


def is_parquet_output(path: Path) -> bool:
    return path.suffix.lower() in SUFFIXES


@dataclass
class ParquetSource:
    """The files of a Parquet input, in order, and where each starts in the joint table."""

    path: Path
    files: list[Path]
    starts: list[int]  # first row of each file in the joint table
    schema: pa.Schema

    def take(self, rows: np.ndarray) -> pa.Table:
        """The rows at ``rows`` (joint row numbers, in that order; -1: a row of NULLs)."""
        missing = rows < 0
        wanted = np.where(missing, np.iinfo(np.int64).max, rows)
        order = np.argsort(wanted, kind="stable")
        ordered = wanted[order]
        pieces = []
        for file, start in zip(self.files, self.starts):
            pf = _open(file, self.path)
            for i in range(pf.num_row_groups):
                n = pf.metadata.row_group(i).num_rows
                lo, hi = np.searchsorted(ordered, [start, start + n])
                if hi > lo:  # only row groups that hold a result row are read
                    table = pf.read_row_group(i)
                    pieces.append(table.take(pa.array(ordered[lo:hi] - start)))
                start += n
        found = int((~missing).sum())
        got = pa.concat_tables(pieces) if pieces else self.schema.empty_table()
        nulls = len(rows) - found
        if nulls:
            empty = pa.table(
                {f.name: pa.nulls(nulls, f.type) for f in self.schema}, schema=self.schema
            )
            got = pa.concat_tables([got, empty])
        # got[j] is the row for order[j]: put every row back where ``rows`` asked for it.
        inverse = np.empty(len(rows), dtype=np.int64)
        inverse[order] = np.arange(len(rows), dtype=np.int64)
        return got.take(pa.array(inverse))


def where(path: Path) -> str:
    return f"input {cut(str(path), _PATH_SHOWN)}"


def source_of(path: Path) -> ParquetSource:
    """The Parquet files of ``path`` with one schema; PreflightError naming what is wrong."""
    here = where(path)
    files = _files(path, here)
    schema: pa.Schema | None = None
    starts, rows = [], 0
    for file in files:
        pf = _open(file, path)
        file_schema = pf.schema_arrow
        if schema is None:
            schema = file_schema
        elif not file_schema.equals(schema):
            raise PreflightError(
                f"{here}: file {cut(file.name, 60)} has other columns or types than "
                f"{cut(files[0].name, 60)}; all files of a Parquet folder need one schema"
            )
        starts.append(rows)
        rows += pf.metadata.num_rows
    assert schema is not None
    return ParquetSource(path, files, starts, schema)


def _files(path: Path, here: str) -> list[Path]:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise PreflightError(
            f"{here}: file or folder not found; check parties.<you>.input in the spec"
        ) from None
    except OSError as exc:
        raise PreflightError(f"{here}: cannot read ({exc.strerror}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        files = sorted(
            p
            for p in path.iterdir()
            if p.suffix.lower() in SUFFIXES and not p.name.startswith((".", "_"))
        )
        if not files:
            raise PreflightError(
                f"{here}: the folder holds no .parquet file; point input at a Parquet file "
                "or a folder of them"
            )
    elif stat.S_ISREG(st.st_mode):
        files = [path]
    else:
        raise PreflightError(
            f"{here}: is {file_kind(st.st_mode)}, not a regular file or folder; point input "
            "at a Parquet file or a folder of them"
        )
    for file in files:
        if not file.is_file():
            raise PreflightError(f"{here}: {cut(file.name, 60)} is not a regular file")
    return files


def _open(file: Path, path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(file)
    except (OSError, pa.ArrowException) as exc:
        name = "" if file == path else f"file {cut(file.name, 60)}: "
        detail = shown(str(exc).split("\n")[0], 60)[1:-1]
        raise PreflightError(
            f"{where(path)}: {name}not a readable Parquet file ({detail})"
        ) from None


def read_keys(source: ParquetSource, keys: tuple[str, ...]) -> pa.Table:
    """The key columns of every row, as text, checked row group by row group."""
    here = where(source.path)
    names = source.schema.names
    missing = [k for k in keys if k not in names]
    if missing:
        listed = ", ".join(cut(n, 20) for n in names[:6]) + (" ..." if len(names) > 6 else "")
        raise PreflightError(
            f"{here}: key column {shown(missing[0], 30)} not found; the columns are: {listed}"
        )
    for k in keys:
        kind = source.schema.field(k).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_integer(kind)):  # fmt: skip
            raise PreflightError(
                f"{here}: key column {shown(k, 30)} has type {kind}; a key must be text or a "
                "whole number (cast it, e.g. to string, when writing the file)"
            )
    parts: list[pa.Table] = []
    for file, group, _, table in _key_groups(source, keys):
        for k in keys:
            nulls = table[k].null_count
            if nulls:
                first = int(np.flatnonzero(pc.is_null(table[k]).to_numpy(zero_copy_only=False))[0])
                raise PreflightError(
                    f"{here}: file {cut(file.name, 60)}, row group {group}: key column "
                    f"{shown(k, 30)} has {nulls} NULL value(s) (first: row {first + 1} of the "
                    "row group); remove or fill those rows"
                )
        parts.append(
            pa.table({k: pc.cast(table[k], pa.string()) for k in keys})  # integers as text
        )
    if not parts or sum(p.num_rows for p in parts) == 0:
        raise PreflightError(f"{here}: has no rows")
    return pa.concat_tables(parts)


def _key_groups(
    source: ParquetSource, keys: tuple[str, ...]
) -> Iterator[tuple[Path, int, int, pa.Table]]:
    for file, start in zip(source.files, source.starts):
        pf = _open(file, source.path)
        for i in range(pf.num_row_groups):
            table = pf.read_row_group(i, columns=list(keys))
            yield file, i, start, table
            start += table.num_rows


def write_table(table: pa.Table, dest: Path) -> None:
    """Write ``table`` as one Parquet file (row groups of at most 1M rows)."""
    pq.write_table(table, dest, row_group_size=1 << 20)
