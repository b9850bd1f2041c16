"""Input inspection, the key encoding handed to SPU, and the result file.

SPU's CSV handling has edge cases (quotes inside multi-column keys break its intermediate
files; relative paths break its C++ side). psi-run therefore never passes key text it has not
checked: every key is mapped to a *canonical key* without quote, comma or control character,
and the mapping is injective, so equal canonical keys mean equal original keys.

* single key column: a value already made of printable ASCII without quote, comma or ``~``
  stays as it is; any other value becomes ``~`` + hex of its UTF-8 bytes, or, when both
  parties know it, ``~`` + the value with only its quote, comma, ``~`` and control bytes
  escaped (``keycode``; no plain value starts with ``~``);
* several key columns: the hex of each value's UTF-8 bytes, joined with ``-``.

Both parties derive the same canonical key from the same original values whatever else their
files contain. When the file is "plain" (one key column, first, every parsed key already
canonical, no CR or BOM anywhere) it is handed to SPU unchanged, which costs nothing; otherwise
a two-column file (canonical key, row number) is, and the result rows are taken from the input.

CSV quoting is syntax, not key text: a file whose header and values are quoted (as pyarrow and
many exports write ``"uid","amount"``) is still plain when no parsed value or column name holds
a quote, comma, CR or LF, so every quote only wraps a field. SPU's v2 reader parses such a file
as pyarrow does and copies the matched rows' raw lines to its output (checked with a real PSI:
``tests/test_quoted_plain.py``). But SPU orders its output by the key field's raw text, quotes
included, so the two parties' outputs line up only when both write their keys alike: a file
whose keys are all quoted (``InputTable.keys_quoted``) goes as it is only when the peer's are
too (told in the handshake), else the canonical way; a file with quotes on some keys and not
others always goes the canonical way. SPU's legacy ``psi_csv`` reader keeps the quotes of a
header name, so for ``api: psi_csv`` a quoted file goes the canonical way too.

The file is never held whole. ``check_input_path`` makes sure it is a regular file (a FIFO is
refused without being opened); ``scan_text``, reading fixed-size chunks, that it is UTF-8
text without NUL bytes whose lines are at most ``LINE_MAX_BYTES`` long (a binary file or an
endless line is refused at once, in a few MB of memory, naming the byte offset), and on the
same chunks ``textfacts`` learns the header, blank lines and what the plain decision needs.
Then Arrow's streaming reader parses the rows batch by batch (``csv_io``): of a file that its
text shows may go to SPU as it is, only a 64-bit hash of each key is kept (``distinct``: the
duplicate check sorts them; the keys are read again on a collision, or when the job needs
canonical keys after all: ``InputTable.load_keys``); of any other file the key columns. The
other columns are read again, batch by batch, only to write a result SPU did not write itself.
"""

from __future__ import annotations

import codecs
import csv
import ctypes
import dataclasses
import functools
import logging
import os
import stat
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from . import csv_io, database, distinct, keycode, parquet_io, rawrows
from .arrowbits import int64_array, string_parts
from .dbspec import DbConfig
from .errors import OutputError, PreflightError, cut, shown
from .normalize import KeyPlan, Normalized, duplicate_rows, normalize_keys
from .specfile import file_kind
from .textfacts import PLAIN, TextFacts

log = logging.getLogger("psi_runner.data")

KEY_COLUMN = "psi_key"
NULL_TEXT = "NULL"  # how a join writes the fields of a row only the peer has (SecretFlow's default)
ROW_COLUMN = "psi_row"
_PLAIN_KEY = r"^[ !#-+\x2d-}]+$"  # printable ASCII except '"', ',' and '~'
_PLAIN_KEY_BYTES = np.zeros(256, dtype=bool)  # the bytes of ``_PLAIN_KEY``
_PLAIN_KEY_BYTES[0x20:0x7F] = True
_PLAIN_KEY_BYTES[[ord('"'), ord(","), ord("~")]] = False
_HEX = np.array([list(f"{i:02x}".encode()) for i in range(256)], dtype=np.uint8)
_HEX16 = _HEX.view("<u2").reshape(256)  # the same two bytes, read as one little-endian word
LINE_MAX_BYTES = 1 << 20  # the longest input line (a CSV row) accepted, without its newline
# Chunks of the pre-scan; at most LINE_MAX_BYTES, so that a longer line always reaches past
# the end of a chunk and is seen at a chunk's edge.
_SCAN_CHUNK = 1 << 20
_HASH_AHEAD = 8  # chunks the input's digest may lag behind the scan (memory: 8 MB at most)
_LONG_LINE, _NUL, _NOT_UTF8 = range(3)  # what the scan finds; at one offset, the first is named
_PATH_SHOWN = 100  # characters of a path a message shows (its two ends)


@dataclass
class InputTable:
    """A checked input: its key columns as text, in file order (``table``), and the keys SPU
    compares (``normalized``: the key columns after the spec's steps, for the rows kept)."""

    path: Path
    columns: list[str]
    table: pa.Table
    plain: bool  # the raw file can be given to SPU as it is
    quoted: bool = False  # the file holds quotes (as syntax only, when ``plain``)
    keys_quoted: bool = False  # every key field is in quotes (``plain``: the same SPU order)
    # plain keys that go to SPU in a canonical-key file written from the file's key column,
    # read again batch by batch (``write_spu_input``), so they are never all held at once
    keys_in_file: bool = False
    normalized: Normalized | None = None  # None: the keys are the file's values, every row
    plan: KeyPlan | None = None  # how the keys were normalised (and the salt, if any)
    # Where the rows are read again, batch by batch, to write the result (CSV, Parquet).
    source: parquet_io.ParquetSource | csv_io.CsvSource | None = None
    released_rows: int = -1  # the rows once ``release`` dropped the table (-1: not dropped)

    @property
    def rows(self) -> int:
        return self.released_rows if self.released_rows >= 0 else self.table.num_rows

    def release(self) -> None:
        """Drop the rows held in memory, for a file SPU reads as it is (its result is SPU's
        own output): the PSI then runs without psi-run's copy of the input beside it."""
        assert self.plain, "only a file SPU reads as it is needs no rows of ours afterwards"
        self._forget_rows()
        self.normalized = None
        release_memory()

    def load_keys(self, keys: tuple[str, ...]) -> None:
        """Read the key columns again when the preflight proved the file plain without
        holding them (``table`` empty) and the job needs them after all (canonical keys)."""
        if isinstance(self.source, csv_io.CsvSource) and self.released_rows >= 0:
            self.source.unchanged()
            self.table = csv_io.read_key_table(self.path, self.source.header, keys)
            self.released_rows = -1

    def spill(self, folder: Path) -> None:
        """Move the keys held in memory to Arrow files in ``folder`` (the run's private work
        folder), read back memory-mapped: while SPU runs they take no memory, and only the
        pages the result check needs are read afterwards."""
        self.table = _spilled(self.table, folder / "keys.arrow")
        if self.normalized is not None:
            spilled = _spilled(self.normalized.keys, folder / "normalized_keys.arrow")
            self.normalized = dataclasses.replace(self.normalized, keys=spilled)
        release_memory()

    def drop_keys(self) -> None:
        """Drop the key columns once SPU's input holds them in a code that decodes back
        (``read_result_rows_and_values``): nothing is spilled or kept while SPU runs. The
        result's rows are read again from ``source``, which must be set."""
        assert self.source is not None, "the result's rows must be readable again"
        self._forget_rows()
        if self.normalized is not None:
            empty = self.normalized.keys.schema.empty_table()
            self.normalized = dataclasses.replace(self.normalized, keys=empty)
        release_memory()

    def _forget_rows(self) -> None:
        """Drop the table, remembering how many rows it had."""
        self.released_rows = self.rows
        self.table = self.table.schema.empty_table()

    def key_table(self, keys: tuple[str, ...]) -> pa.Table:
        """The keys SPU compares, one row per row given to SPU."""
        if self.normalized is not None:
            return self.normalized.keys
        return self.table.select(list(keys))

    def input_rows(self, positions: np.ndarray) -> np.ndarray:
        """Input row numbers of rows given to SPU at ``positions`` (-1 stays -1)."""
        if self.normalized is None or self.normalized.kept is None:
            return positions
        kept = self.normalized.kept
        return np.where(positions < 0, -1, kept[np.maximum(positions, 0)])


def _spilled(table: pa.Table, path: Path) -> pa.Table:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def _where(kind: str, path: Path) -> str:
    return f"{kind} {cut(str(path), _PATH_SHOWN)}"


def check_input_path(path: Path) -> None:
    """Make sure the input is a regular file, without opening it; PreflightError if not."""
    _input_stat(path, _where("input", path))


def _input_stat(path: Path, where: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise PreflightError(
            f"{where}: file not found; check parties.<you>.input in the spec"
        ) from None
    except OSError as exc:
        raise PreflightError(f"{where}: cannot read ({exc.strerror}); check the path") from None
    except ValueError:  # a NUL byte or a lone surrogate (the spec refuses both)
        raise PreflightError(f"{where}: not a usable file name") from None
    _refuse_kind(st, where)
    return st


def _refuse_kind(st: os.stat_result, where: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise PreflightError(
            f"{where}: is a folder; point input at a CSV file (or a Parquet file or folder)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise PreflightError(
            f"{where}: is {file_kind(st.st_mode)}, not a regular file; save the data to a "
            "CSV file and point input at it"
        )


def _open_input(path: Path, where: str) -> int:
    """A read descriptor of the regular file at ``path`` (checked before and after opening)."""
    _input_stat(path, where)
    try:  # O_NONBLOCK: should it have become a FIFO since the check, open() does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise PreflightError(
            f"{where}: cannot read ({exc.strerror}); check its permissions"
        ) from None
    try:
        _refuse_kind(os.fstat(fd), where)
    except BaseException:
        os.close(fd)
        raise
    return fd


class _HashBehind:
    """A hash of the chunks a scan reads, in order, computed on a worker thread (hashlib lets
    go of the GIL for large buffers) at most ``_HASH_AHEAD`` chunks behind the scan, so the
    file's digest costs no second read and little time on a machine with a core to spare."""

    def __init__(self, hasher) -> None:
        self._hasher = hasher
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="input-digest")
        self._pending: deque[Future] = deque()

    def feed(self, chunk: bytes) -> None:
        self._pending.append(self._pool.submit(self._hasher.update, chunk))
        if len(self._pending) > _HASH_AHEAD:
            self._pending.popleft().result()

    def hexdigest(self) -> str:
        while self._pending:
            self._pending.popleft().result()
        self._pool.shutdown()
        return self._hasher.hexdigest()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def scan_text(fd: int, where: str, hashing: _HashBehind | None = None) -> TextFacts:
    """Refuse, naming the byte offset, a file that is not UTF-8, holds a NUL byte or has a
    line longer than ``LINE_MAX_BYTES``; reads ``fd`` to its end in fixed-size chunks and
    returns what it learned on the way (``TextFacts``). ``hashing`` gets every chunk read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    facts = TextFacts()
    offset = 0  # of the chunk in the file
    line_start, line_no = 0, 1  # where the current line starts, and its number
    while True:
        chunk = os.read(fd, _SCAN_CHUNK)
        found: list[tuple[int, int, int]] = []  # (offset, kind, the byte there); first counts
        held = decoder.getstate()[0]  # the start of a character split by the chunk's edge
        rest = chunk.translate(None, PLAIN)  # bytes outside the plain alphabet: most chunks none
        if held or not rest.isascii():  # ASCII is UTF-8: most chunks need no decoding
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as exc:
                at = offset - len(held) + exc.start
                found.append((at, _NOT_UTF8, (held + chunk)[exc.start]))
        nul = chunk.find(b"\0") if b"\0" in rest else -1
        if nul >= 0:
            found.append((offset + nul, _NUL, 0))
        first_newline = chunk.find(b"\n")
        line_end = offset + (first_newline if first_newline >= 0 else len(chunk))
        if line_end - line_start > LINE_MAX_BYTES:
            found.append((line_start + LINE_MAX_BYTES, _LONG_LINE, 0))
        if found:
            at, kind, byte = min(found)
            line = line_no + chunk.count(b"\n", 0, max(at - offset, 0))
            raise PreflightError(_scan_refusal(where, kind, at, line, byte, line_start, line_no))
        if not chunk:
            return facts.finish()
        if hashing is not None:
            hashing.feed(chunk)
        newlines = int(np.count_nonzero(np.frombuffer(chunk, dtype=np.uint8) == 0x0A))
        facts.feed(chunk, rest, newlines)
        if newlines:
            line_start, line_no = offset + chunk.rfind(b"\n") + 1, line_no + newlines
        offset += len(chunk)


def _scan_refusal(
    where: str, kind: int, at: int, line: int, byte: int, line_start: int, line_no: int
) -> str:
    if kind == _LONG_LINE:
        return (
            f"{where}: line {line_no} (from byte offset {line_start}) is longer than "
            f"{LINE_MAX_BYTES} bytes, the most a row may have; is it a CSV text file?"
        )
    if kind == _NUL:
        return (
            f"{where}: not CSV text (a NUL byte at line {line}, byte offset {at}); is it a "
            "binary or UTF-16 file?"
        )
    return (
        f"{where}: not UTF-8 text (byte 0x{byte:02x} at line {line}, byte offset {at}); "
        "convert it, e.g. iconv -f GBK -t UTF-8"
    )


def inspect_input(
    path: Path,
    keys: tuple[str, ...],
    allow_duplicates: bool = False,
    plan: KeyPlan | None = None,
    keys_needed: bool = False,
    digest=None,
) -> InputTable:
    """Read and check the input CSV, normalising its keys as ``plan`` says; raise
    PreflightError with one readable sentence. ``keys_needed``: the job takes the canonical
    path whatever the file (e.g. a Parquet output), so the keys are held, not only hashed.
    ``digest``: a hashlib object fed the file's bytes as they are checked; its hex digest
    ends up in the input's ``source.digest`` (a checkpoint's input digest).

    The file is read twice, streaming, never whole: its bytes (``scan_text``), then its rows
    as Arrow batches (``csv_io``), of which only the key columns are kept."""
    where = _where("input", path)
    fd = _open_input(path, where)
    hashing = _HashBehind(digest) if digest is not None else None
    try:
        facts = scan_text(fd, where, hashing)
        header = _checked_header(facts, keys, where)
        candidate = not keys_needed and _plain_candidate(facts, header, keys, plan)
        got = csv_io.read_keys(fd, header, keys, facts.has_quote, keep=not candidate,
                               expected_rows=facts.data_lines + 1)  # fmt: skip
        if got.rows and candidate and not _plain_by_hashes(got, header, allow_duplicates):
            # not plain after all (an empty key, quoted text) or two equal hashes: the keys
            got = csv_io.read_keys(fd, header, keys, facts.has_quote)
        st = os.fstat(fd)
        file_digest = hashing.hexdigest() if hashing is not None else None
    except OSError as exc:
        raise PreflightError(
            f"{where}: cannot read ({exc.strerror}); check its permissions"
        ) from None
    except pa.ArrowInvalid as exc:
        detail = shown(str(exc).split("\n")[0], 90)[1:-1]  # pyarrow quotes the row: cut it
        raise PreflightError(f"{where}: not a well-formed CSV file ({detail})") from None
    finally:
        os.close(fd)
        if hashing is not None:
            hashing.close()  # after a refusal; nothing is left to do once the digest is taken
    if got.rows == 0:
        raise PreflightError(f"{where}: has a header but no rows")
    source = csv_io.CsvSource(path, header, st.st_size, st.st_mtime_ns, file_digest)
    quoted = facts.has_quote
    if got.table is None:  # plain, distinct keys, proven without holding them
        return InputTable(
            path=path,
            columns=header,
            table=pa.table({k: pa.array([], pa.string()) for k in keys}),
            plain=True,
            quoted=quoted,
            keys_quoted=quoted and _first_field_quoting(facts) == "all",
            plan=plan,
            source=source,
            released_rows=got.rows,
        )
    table = got.table
    normalized = _checked_keys(table, keys, allow_duplicates, plan, where)
    # SPU aligns the two outputs row by row only when the key is the first column (it sorts
    # by the first column otherwise); the canonical-key file always has the key first.
    plain = (
        _unchanged(normalized)
        and len(keys) == 1
        and header[0] == keys[0]
        and not facts.bom
        and not facts.has_cr
        and (not quoted or not (_names_hold_quoted_text(header) or got.quoted_text))
        and _plain_keys(table[keys[0]], facts.plain_or_quote)
    )
    keys_quoted = False
    if plain and quoted:
        form = _first_field_quoting(facts)
        plain, keys_quoted = form is not None, form == "all"
    return InputTable(
        path=path,
        columns=header,
        table=table,
        plain=plain,
        quoted=quoted,
        keys_quoted=keys_quoted,
        normalized=normalized,
        plan=plan,
        source=source,
    )


def _plain_candidate(
    facts: TextFacts, header: list[str], keys: tuple[str, ...], plan: KeyPlan | None
) -> bool:
    """Whether the file may go to SPU as it is, as far as its text shows (the values decide
    the rest): then the preflight hashes its keys instead of holding them."""
    return (
        (plan is None or not plan.active)
        and len(keys) == 1
        and header[0] == keys[0]
        and not facts.bom
        and not facts.has_cr
        and facts.plain_or_quote
        and not (facts.has_quote and _names_hold_quoted_text(header))
        and (not facts.has_quote or _first_field_quoting(facts) is not None)
    )


def _plain_by_hashes(got: csv_io.KeyColumns, header: list[str], allow_duplicates: bool) -> bool:
    """A plain candidate read as hashes is plain, with distinct keys (or duplicates allowed):
    no empty key, no quoted text, and no two hashes equal (else the keys are read to check)."""
    assert got.hashes is not None
    if got.shortest == 0 or got.quoted_text:
        return False
    return allow_duplicates or distinct.hashes_distinct(got.hashes)


def _checked_header(facts: TextFacts, keys: tuple[str, ...], where: str) -> list[str]:
    """The column names, after every check that needs only the text's facts."""
    if facts.empty:
        raise PreflightError(f"{where}: the file is empty; it needs a header line and rows")
    header_line = facts.header.decode("utf-8").rstrip("\r")
    if "\r" in header_line:  # csv would say "new-line character seen in unquoted field"
        raise PreflightError(
            f"{where}: its first line holds a CR alone (old Mac line breaks?); save it with LF "
            "or CRLF line breaks"
        )
    try:
        header = next(csv.reader([header_line]), [])
    except csv.Error as exc:  # e.g. a column name over csv's field limit (128 KiB)
        raise PreflightError(f"{where}: the header line is not CSV ({cut(str(exc), 60)})") from None
    if not header or all(not h.strip() for h in header):
        raise PreflightError(f"{where}: header missing; the first line must name the columns")
    dup_cols = sorted(name for name, count in Counter(header).items() if count > 1)
    if dup_cols:
        raise PreflightError(f"{where}: header names column {shown(dup_cols[0])} twice; rename one")
    names = set(header)
    missing = [k for k in keys if k not in names]
    if missing:
        raise PreflightError(
            f"{where}: key column {shown(missing[0], 30)} not found; the columns are: "
            + _column_list(header)
        )
    if facts.blank_line:
        raise PreflightError(f"{where}: line {facts.blank_line} is blank; remove blank lines")
    if not facts.header_ends:  # a lone header without a newline; pyarrow's message is obscure
        raise PreflightError(f"{where}: has a header but no rows")
    return header


def _checked_keys(
    table: pa.Table,
    keys: tuple[str, ...],
    allow_duplicates: bool,
    plan: KeyPlan | None,
    where: str,
) -> Normalized | None:
    """Normalise the keys as ``plan`` says and refuse duplicates (unless allowed)."""
    normalized = None
    if plan is not None and plan.active:
        normalized = normalize_keys(table, plan, where)
        if not allow_duplicates:
            _check_normalized_duplicates(normalized, where)
    elif not allow_duplicates:
        _check_duplicates(table, keys, where)
    return normalized


def inspect_parquet(
    path: Path,
    keys: tuple[str, ...],
    allow_duplicates: bool = False,
    plan: KeyPlan | None = None,
) -> InputTable:
    """Check a Parquet file or folder (``parquet_io``) by the same rules as a CSV file;
    only its key columns are kept in memory."""
    source = parquet_io.source_of(path)
    table = parquet_io.read_keys(source, keys)
    normalized = _checked_keys(table, keys, allow_duplicates, plan, parquet_io.where(path))
    return InputTable(
        path=path,
        columns=source.schema.names,
        table=table,
        plain=False,  # SPU reads CSV only: it always gets the canonical-key file
        normalized=normalized,
        plan=plan,
        source=source,
    )


def inspect_database(
    cfg: DbConfig,
    keys: tuple[str, ...],
    allow_duplicates: bool,
    plan: KeyPlan | None,
    spool: Path,
) -> InputTable:
    """Check a PostgreSQL table or query (``database``) by the same rules as a CSV file; its
    rows are spooled to ``spool`` (Parquet, in the run's private folder), its keys kept."""
    where = f"input {cfg.describe()}"
    got = database.read_input(cfg, keys, spool, where)
    normalized = _checked_keys(got.keys, keys, allow_duplicates, plan, where)
    return InputTable(
        path=spool,
        columns=got.columns,
        table=got.keys,
        plain=False,
        normalized=normalized,
        plan=plan,
        source=parquet_io.source_of(spool),
    )


def keys_form(inp: InputTable) -> str:
    """How this side's keys reach SPU, for the peer: "quoted", "bare" or "canonical"."""
    if not inp.plain:
        return "canonical"
    return "quoted" if inp.keys_quoted else "bare"


def use_system_allocator() -> None:
    """Make Arrow allocate with the C library's malloc in this process, not jemalloc.

    jemalloc hands freed pages back lazily (``MADV_FREE``), so they stay in the process's RSS:
    at 10M awkward keys the job process still held 330 MB after dropping every Arrow table,
    and SPU's process, forked from it (``backends.embedded``), started with all of it. With
    malloc, 96 MB; preflight and the canonical-key file take as long (measured in one run)."""
    pool = pa.system_memory_pool()
    if pa.default_memory_pool().backend_name != pool.backend_name:
        pa.set_memory_pool(pool)


def release_memory() -> None:
    """Give memory that Arrow no longer uses back to the system (jemalloc keeps it a while),
    and the free pages of glibc's heaps (SPU's C++ memory once the PSI is over: without it the
    result stage's Arrow memory came on top of SPU's freed but kept peak)."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():  # glibc's malloc_trim, or None elsewhere
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def _unchanged(normalized: Normalized | None) -> bool:
    """Normalisation left every key as it was and every row in (the file can go to SPU)."""
    if normalized is None:
        return True
    return normalized.kept is None and not any(s.changed for s in normalized.stats.values())


def _check_normalized_duplicates(normalized: Normalized, where: str) -> None:
    extra, first, second = duplicate_rows(normalized.keys)
    if not extra:
        return
    kept = normalized.kept
    first, second = (int(kept[first]), int(kept[second])) if kept is not None else (first, second)
    raise PreflightError(
        f"{where}: after normalisation {extra} row(s) repeat the key of an earlier row (e.g. "
        f"data rows {first + 1} and {second + 1}); deduplicate the file or set "
        "allow_duplicate_keys: true in the spec"
    )


def _column_list(header: list[str]) -> str:
    """The header's names for a message: as many as fit in about 45 characters."""
    names: list[str] = []
    for name in header:
        name = cut(name, 20) if name.isprintable() else shown(name, 16)
        if names and sum(len(n) + 2 for n in names) + len(name) > 45:
            return ", ".join(names) + f" ... ({len(header)} columns)"
        names.append(name)
    return ", ".join(names)


def _names_hold_quoted_text(header: list[str]) -> bool:
    """A column name with a quote, comma, CR or LF (only quoting can put it there)."""
    return any(any(c in name for c in '",\n\r') for name in header)


def _first_field_quoting(facts: TextFacts) -> str | None:
    """Whether the first field of every data line is quoted ("all"), none is ("none"), or
    some are (None). Only for a file whose lines are its rows (no quoted text)."""
    if facts.quoted_starts == 0:
        return "none"
    return "all" if facts.quoted_starts == facts.data_lines else None


def _plain_keys(column: pa.ChunkedArray, plain_bytes: bool) -> bool:
    if pc.min(pc.binary_length(column)).as_py() == 0:
        return False  # an empty key is encoded ("~"), so the raw file cannot be used
    if plain_bytes:
        return True  # every byte of the file is in the plain alphabet (or a separator)
    return bool(pc.all(pc.match_substring_regex(column, _PLAIN_KEY)).as_py())


def _all_distinct(column: pa.ChunkedArray) -> bool:
    """No value repeats (``distinct``: hashed with numpy, sorted; exact on a collision)."""
    return distinct.all_distinct(column)


def _check_duplicates(table: pa.Table, keys: tuple[str, ...], where: str) -> None:
    if len(keys) == 1 and _all_distinct(table[keys[0]]):
        return  # the common case, about twice as fast as grouping
    grouped = table.select(list(keys)).group_by(list(keys)).aggregate([([], "count_all")])
    if grouped.num_rows == table.num_rows:
        return
    dups = grouped.filter(pc.greater(grouped["count_all"], 1))
    extra = table.num_rows - grouped.num_rows
    example = ", ".join(f"{cut(k, 30)}={shown(dups[k][0].as_py())}" for k in keys[:4])
    raise PreflightError(
        f"{where}: {extra} duplicate key row(s) in {dups.num_rows} key(s), e.g. {example}; "
        "deduplicate the file or set allow_duplicate_keys: true in the spec"
    )


def _hex(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Hex of each value's UTF-8 bytes, vectorised (no Python loop over rows)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.cast(pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    raw = arr.buffers()[2]
    data = np.frombuffer(raw, dtype=np.uint8) if raw is not None else np.zeros(0, np.uint8)
    start = int(offsets[0]) if n else 0
    end = int(offsets[-1]) if n else 0
    hexed = _HEX16[data[start:end]]  # two hex digits per byte, as one uint16: one gather
    new_offsets = ((offsets - start) * 2).astype(np.int64)
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(new_offsets.tobytes()), pa.py_buffer(hexed.tobytes())
    )


def canonical_keys(table: pa.Table, keys: tuple[str, ...], code: str = keycode.HEX) -> pa.Array:
    """The canonical key of every row (see the module docstring); ``code`` says how a
    single column's non-plain values are written (``keycode``)."""
    if len(keys) == 1:
        col = table[keys[0]].combine_chunks().cast(pa.large_string())
        encode = ~_plain_values(col)
        if not encode.any():
            return col
        mask = _bool_array(encode)
        write = keycode.tilde_escape if code == keycode.ESCAPE else _tilde_hex
        return pc.replace_with_mask(col, mask, write(col.filter(mask)))
    parts = [_hex(table[k]) for k in keys]
    return pc.binary_join_element_wise(*parts, _const("-", table.num_rows))


def _plain_values(arr: pa.Array) -> np.ndarray:
    """Whether each value of a large_string array is a plain key (``_PLAIN_KEY``: not empty,
    every byte in ``_PLAIN_KEY_BYTES``), with numpy over the bytes (a regex costs 4x more)."""
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    raw = arr.buffers()[2]
    first, last = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
    if last == first:
        return np.zeros(n, dtype=bool)
    bad = ~_PLAIN_KEY_BYTES[np.frombuffer(raw, dtype=np.uint8)[first:last]]
    full = np.diff(offsets) > 0  # an empty value is not plain, and takes no bytes
    plain = np.zeros(n, dtype=bool)
    # a bad byte in each non-empty value? their bytes lie back to back, each to the next's
    # start (a bool reduceat: an integer sum would cast every byte first, 10x slower)
    plain[full] = ~np.logical_or.reduceat(bad, offsets[:-1][full] - first)
    return plain


def _tilde_hex(arr: pa.Array) -> pa.Array:
    """``~`` and the hex of each value's UTF-8 bytes, vectorised."""
    hexed = _hex(arr)
    n = len(hexed)
    offsets = np.frombuffer(hexed.buffers()[1], dtype=np.int64)[: n + 1]
    raw = hexed.buffers()[2]
    body = np.frombuffer(raw, dtype=np.uint8)[: offsets[-1]] if raw is not None else b""
    new_offsets = offsets + np.arange(n + 1, dtype=np.int64)
    out = np.full(int(new_offsets[-1]), ord("~"), dtype=np.uint8)
    keep = np.ones(len(out), dtype=bool)
    keep[new_offsets[:-1]] = False  # each value's first byte stays "~"
    out[keep] = body
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(new_offsets.tobytes()), pa.py_buffer(out.tobytes())
    )


def _bool_array(values: np.ndarray) -> pa.Array:
    """A boolean Arrow array over numpy bools (pa.array() on numpy would import pandas)."""
    bits = np.packbits(values, bitorder="little")
    return pa.BooleanArray.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])


def _const(text: str, n: int) -> pa.Array:
    """``n`` copies of ``text`` as a large_string array (pa.scalar would import pandas)."""
    raw = text.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int64) * len(raw)
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(raw * n)
    )


_WRITE_SLICE = 1 << 20  # rows of the canonical-key file built and written at a time


def write_spu_input(
    inp: InputTable,
    keys: tuple[str, ...],
    dest: Path,
    code: str = keycode.HEX,
    presort: str = "",
) -> None:
    """Write the (canonical key, position) file that SPU reads instead of the input; a
    position is a row of ``inp.key_table`` (``inp.input_rows`` maps it to the input row);
    ``code``: how non-plain keys are written (``keycode``, the same at both parties).

    Slice by slice (``_WRITE_SLICE`` rows), so the temporaries stay small; each slice's keys
    are written as ``string``, not ``large_string`` (Arrow's CSV writer is 20x slower on
    the latter: 7.5 s against 0.35 s for 10M keys).

    ``presort`` (``"fast"``, or ``"stable"`` when keys may repeat): each slice's rows go out
    ordered by their key's first 8 bytes. SPU starts by sorting its whole input with GNU
    sort, which takes a third of the CPU on input already nearly in order (10M keys: 2.3 s
    against 6.7 s); the order costs this side about 0.7 s, and what SPU computes is the same (it
    sorts anyway, stably, and each row carries its position). ``"stable"`` keeps rows of
    equal keys in file order, as SPU's stable sort would have."""
    options = pcsv.WriteOptions(quoting_style="none", include_header=False)
    # A bare header: pyarrow quotes header names, which SPU's legacy (psi_csv) reader keeps.
    with open(dest, "wb") as fh:
        fh.write(f"{KEY_COLUMN},{ROW_COLUMN}\n".encode())
        start = 0
        for piece in _key_slices(inp, keys):
            n = piece.num_rows
            texts = canonical_keys(piece, keys, code).cast(pa.string())
            positions = np.arange(start, start + n, dtype=np.int64)
            if presort and n > 1:
                order = np.argsort(
                    _prefix_words(texts), kind="stable" if presort == "stable" else None
                )
                texts = texts.take(int64_array(order))
                positions = order + start
            t = pa.table({KEY_COLUMN: texts, ROW_COLUMN: int64_array(positions)})
            pcsv.write_csv(t, fh, options)
            start += n
    if inp.keys_in_file and start != inp.rows:  # unchanged() missed it (same size and time)
        raise OutputError(
            f"{_where('input', inp.path)}: changed while the job ran ({start} rows read for "
            f"SPU, {inp.rows} checked); no result was written, run the job again"
        )


def _key_slices(inp: InputTable, keys: tuple[str, ...]) -> Iterator[pa.Table]:
    """The key columns, ``_WRITE_SLICE`` rows at a time: from the table held, or read again
    from the file (``keys_in_file``), batch by batch."""
    if not inp.keys_in_file:
        key_table = inp.key_table(keys)
        for start in range(0, key_table.num_rows, _WRITE_SLICE):
            yield key_table.slice(start, _WRITE_SLICE)
        return
    source = inp.source
    assert isinstance(source, csv_io.CsvSource), "keys are read again from a CSV input only"
    source.unchanged()
    held: list[pa.RecordBatch] = []
    rows = 0
    with open(source.path, "rb") as fh:
        for batch in csv_io.open_batches(fh, source.header, list(dict.fromkeys(keys))):
            held.append(batch)
            rows += batch.num_rows
            if rows >= _WRITE_SLICE:
                whole = pa.Table.from_batches(held).combine_chunks()
                for start in range(0, rows - rows % _WRITE_SLICE, _WRITE_SLICE):
                    yield whole.slice(start, _WRITE_SLICE)
                rest = whole.slice(rows - rows % _WRITE_SLICE)
                held, rows = rest.to_batches(), rest.num_rows
    if rows:
        yield pa.Table.from_batches(held).combine_chunks()
    source.unchanged()


# _PREFIX_MASK[n]: the bits of a big-endian 8-byte word that hold a value's first n bytes
_PREFIX_MASK = np.array(
    [0] + [((1 << (8 * n)) - 1) << (8 * (8 - n)) for n in range(1, 9)], dtype=np.uint64
)


def _prefix_words(arr: pa.Array) -> np.ndarray:
    """Each value's first 8 bytes as a big-endian number, zero-padded (so the numbers order
    as the bytes do: ``C``-locale order, up to ties of values that share those 8 bytes).

    One unaligned 8-byte load per value from a padded copy of the bytes (a numpy view with
    a stride of one byte), no loop over rows or bytes."""
    offsets, raw = string_parts(arr)
    first, last = int(offsets[0]), int(offsets[-1])
    padded = np.zeros(last - first + 8, dtype=np.uint8)
    if raw is not None and last > first:
        padded[: last - first] = np.frombuffer(raw, dtype=np.uint8)[first:last]
    words = np.ndarray(shape=(last - first + 1,), dtype=">u8", buffer=padded, strides=(1,))
    starts = offsets[:-1].astype(np.int64) - first
    lengths = np.minimum(np.diff(offsets), 8)
    return words[starts].astype(np.uint64) & _PREFIX_MASK[lengths]


def read_result_rows(spu_output: Path) -> np.ndarray:
    """Row numbers listed in SPU's output of a canonical-key run, in SPU's order."""
    return _read_canonical_result(spu_output, with_keys=False)[0]


def read_result_rows_and_values(
    spu_output: Path, as_text: bool = False
) -> tuple[np.ndarray, pa.ChunkedArray]:
    """Row numbers and key values of SPU's output of an ``escape``-coded canonical-key run
    (one key column), in SPU's order: the keys are decoded from SPU's own output, so the
    run need not keep its own copy of them while SPU runs. ``as_text``: the keys as SPU
    compared them, not decoded (what the result check digests when both sides can)."""
    rows, keys = _read_canonical_result(spu_output, with_keys=True)
    assert keys is not None
    if as_text:
        return rows, keys
    decoded = [keycode.tilde_unescape(chunk) for chunk in keys.chunks]
    return rows, pa.chunked_array(decoded, pa.large_string())


def _read_canonical_result(
    spu_output: Path, with_keys: bool
) -> tuple[np.ndarray, pa.ChunkedArray | None]:
    if not spu_output.exists() or spu_output.stat().st_size == 0:
        empty = pa.chunked_array([], pa.string()) if with_keys else None
        return np.zeros(0, dtype=np.int64), empty
    columns = [ROW_COLUMN, KEY_COLUMN] if with_keys else [ROW_COLUMN]
    t = pcsv.read_csv(
        spu_output,
        convert_options=pcsv.ConvertOptions(
            include_columns=columns,
            column_types={ROW_COLUMN: pa.int64(), KEY_COLUMN: pa.string()},
            null_values=[NULL_TEXT],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )
    col = t[ROW_COLUMN].combine_chunks()
    if col.null_count:  # a join's row that only the peer has: -1 stands for "no row of ours"
        col = pc.fill_null(col, -1)
    # Straight from the buffer: to_numpy() would import pandas.
    rows = np.frombuffer(col.buffers()[1], dtype=np.int64)[col.offset : col.offset + len(col)]
    return rows, t[KEY_COLUMN] if with_keys else None


def read_result_keys(spu_output: Path, keys: tuple[str, ...]) -> pa.Table:
    """The key columns of SPU's output of a file it read as it is, in SPU's order."""
    if not spu_output.exists() or spu_output.stat().st_size == 0:
        return pa.table({k: pa.array([], pa.string()) for k in keys})
    return pcsv.read_csv(
        spu_output,
        convert_options=pcsv.ConvertOptions(
            include_columns=list(keys),
            column_types={k: pa.string() for k in keys},
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
        ),
    )


def result_table(inp: InputTable, rows: np.ndarray) -> pa.Table:
    """The input rows at ``rows``, in that order, with the input's columns and types; a row
    at -1 (a join's row that only the peer has) is NULL in every column."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    if inp.source is not None:
        return inp.source.take(rows)
    missing = rows < 0
    valid = pa.py_buffer(np.packbits(~missing, bitorder="little")) if missing.any() else None
    index = np.where(missing, 0, rows)
    return inp.table.take(
        pa.Int64Array.from_buffers(pa.int64(), len(rows), [valid, pa.py_buffer(index)])
    )


def write_result(inp: InputTable, rows: np.ndarray, dest: Path) -> int:
    """Write the input rows at ``rows`` (in that order) with the input's columns; return count.

    A CSV result of a CSV input whose rows are its lines is the input's own lines
    (``rawrows``); otherwise ``dest`` is Parquet (``parquet_io.is_parquet_output``: the
    input's column types, and the rows of a join that only the peer has are NULL) or CSV
    (those rows' fields are ``NULL_TEXT``)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    source = inp.source
    raw = isinstance(source, csv_io.CsvSource) and not parquet_io.is_parquet_output(dest)
    if raw and not (rows < 0).any():  # every row is one of ours: copy the input's lines
        assert isinstance(source, csv_io.CsvSource)
        source.unchanged()
        release_memory()  # what Arrow freed after the result check: numpy allocates apart
        starts = rawrows.line_starts(source.path, inp.rows)
        if starts is not None:
            count = rawrows.write_rows(source.path, starts, rows, dest)
            source.unchanged()
            return count
    out = result_table(inp, rows)
    if parquet_io.is_parquet_output(dest):
        parquet_io.write_table(out, dest)
        return out.num_rows
    missing = np.asarray(rows) < 0
    if missing.any():  # a join's rows that only the peer has: every field is NULL_TEXT
        mask = pa.array(missing)
        out = pa.table(
            {
                name: pc.if_else(mask, NULL_TEXT, pc.cast(out[name], pa.string()))
                for name in out.column_names
            }
        )
    pcsv.write_csv(out, dest, pcsv.WriteOptions(quoting_style="needed"))
    return out.num_rows


def count_csv_rows(path: Path) -> int:
    """Data rows of a plain CSV written by SPU (header excluded)."""
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 20), b""))
    return max(lines - 1, 0)


def check_work_folder(folder: Path, where: str) -> None:
    """The local folder of a run whose output is not a file: created, writable."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PreflightError(
            f"{where}: cannot create the work folder {cut(str(folder), _PATH_SHOWN)} "
            f"({exc.strerror}); set parties.<you>.work_dir"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PreflightError(
            f"{where}: the work folder {cut(str(folder), _PATH_SHOWN)} is not writable; set "
            "parties.<you>.work_dir"
        )


def check_output_location(path: Path) -> None:
    """Make sure the output is absent or a regular file (it is replaced by a rename) and its
    folder exists (creating it) and is writable. A device such as /dev/null, a FIFO, a socket
    or a folder is refused."""
    folder = path.parent
    where = _where("output", path)
    try:
        st: os.stat_result | None = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None  # absent; a file in place of a folder on the way is named below
    except OSError as exc:
        raise PreflightError(f"{where}: cannot check it ({exc.strerror}); check the path") from None
    except ValueError:  # a NUL byte or a lone surrogate (the spec refuses both)
        raise PreflightError(f"{where}: not a usable file name") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise PreflightError(f"{where}: is a folder; name a file")
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise PreflightError(
            f"{where}: is {file_kind(st.st_mode)}, not a regular file; name a new or "
            "regular file for the result"
        )
    shown_folder = cut(str(folder), _PATH_SHOWN)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        # "File exists" / "Not a directory" do not say what is in the way: name the file.
        blocker = next(
            (p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None
        )
        reason = (
            f"{cut(str(blocker), _PATH_SHOWN)} is a file, not a folder"
            if blocker is not None
            else exc.strerror
        )
        raise PreflightError(
            f"{where}: cannot create folder {shown_folder} ({reason}); choose another output path"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PreflightError(
            f"{where}: folder {shown_folder} is not writable; fix its permissions or move the "
            "output"
        )
