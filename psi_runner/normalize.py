"""Key normalisation: the spec's steps applied to this party's key columns, column at a time.

Every step works on a whole arrow column (pyarrow compute kernels, numpy on the buffers);
only ``e164`` (libphonenumber, see ``phones``) and ``sha256`` (hashlib, on the raw buffer)
touch values one by one. A value that a step cannot parse becomes null (*invalid*); a value
that is empty after any step is *empty*. Both are counted per column and then refused or
dropped as ``on_invalid`` says. Messages carry counts and row numbers, never key values.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import stat
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import phones
from .errors import PreflightError, cut
from .keyspec import Step, salted
from .spec import JobSpec
from .workers import cores, map_chunks

log = logging.getLogger("psi_runner.normalize")

# White space as Python's str.isspace() has it (checked against it in the tests).
_SPACES = r"[\t\n\v\f\r\x1c-\x1f\x{85}\p{Z}]+"
_EMAIL = r"^[^@\s]+@[^@\s]+$"
_GMAIL = r"@(gmail|googlemail)\.com$"
# sha256: values per pool task, and the column size from which the pool pays (measured in
# bench/bench_normalize.py: about 0.5 us a value in one process, 0.3 s to start a pool).
_HASH_CHUNK = 500_000
HASH_PARALLEL_FROM = 2_000_000
# With 2 cores the pool was slower than one process (moving the bytes costs more than the
# hashing saves); from 4 cores on it should pay, which was not measured here.
HASH_PARALLEL_CORES = 4
_DIGITS_SLICE = 1 << 20  # rows per slice of digits_only
SALT_MIN_BYTES = 16
SALT_MAX_BYTES = 4096
_B64 = np.full(256, 255, np.uint8)  # base64 character -> 6-bit value; both alphabets
for _i, _c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"):
    _B64[_c] = _i
_B64[[ord("+"), ord("-")]] = 62
_B64[[ord("/"), ord("_")]] = 63


@dataclass(frozen=True)
class KeyPlan:
    """How this party turns its key columns into the keys SPU compares."""

    keys: tuple[str, ...]
    steps: dict[str, tuple[Step, ...]]  # columns this party normalises (not its prehashed ones)
    prehashed: dict[str, str]  # this party's columns that already hold SHA-256
    on_invalid: str = "refuse"
    salt: bytes | None = field(default=None, repr=False)  # never in a repr or a log line

    @property
    def active(self) -> bool:
        return bool(self.steps or self.prehashed)


@dataclass(frozen=True)
class ColumnStats:
    """What normalisation did to one key column (counts of rows)."""

    changed: int  # valid rows whose key differs from the value in the file
    empty: int  # rows whose key became empty
    invalid: int  # rows a step could not parse

    def as_dict(self) -> dict[str, int]:
        return {"changed": self.changed, "empty": self.empty, "invalid": self.invalid}


@dataclass
class Normalized:
    """The keys SPU will compare: one column per key, for the rows kept."""

    keys: pa.Table
    kept: np.ndarray | None  # the input row (0-based) of each kept row; None: every row
    stats: dict[str, ColumnStats]
    dropped: int = 0


def plan_for(spec: JobSpec, party: str) -> KeyPlan:
    """This party's plan; reads its salt file when a step needs it (PreflightError)."""
    me = spec.parties[party]
    steps = {c: s for c, s in spec.normalize.items() if c not in me.prehashed}
    salt = None
    if any(salted(s) for s in steps.values()):
        assert me.salt_file is not None  # the spec requires it
        salt = read_salt(me.salt_file, f"parties.{party}.salt_file")
    return KeyPlan(spec.keys, steps, dict(me.prehashed), spec.on_invalid, salt)


def read_salt(path: Path, where: str) -> bytes:
    """The salt: the file's bytes without one final line break."""
    shown_path = cut(str(path), 80)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise PreflightError(f"{where} {shown_path}: not a regular file")
        if st.st_size > SALT_MAX_BYTES:
            raise PreflightError(
                f"{where} {shown_path}: over {SALT_MAX_BYTES} bytes; is it the salt?"
            )
        raw = path.read_bytes()
    except OSError as exc:
        raise PreflightError(f"{where} {shown_path}: cannot read ({exc.strerror})") from None
    salt = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1] if raw.endswith(b"\n") else raw
    if len(salt) < SALT_MIN_BYTES:
        raise PreflightError(
            f"{where} {shown_path}: a salt needs at least {SALT_MIN_BYTES} bytes, this has "
            f"{len(salt)}; e.g. openssl rand -hex 32 > salt.txt, shared with the other party"
        )
    return salt


def salt_fingerprint(job_id: str, salt: bytes) -> str:
    """A short fingerprint that tells whether both sides hold the same salt (bound to the job,
    so it cannot be matched across jobs); it does not reveal a salt of 16 random bytes."""
    material = b"psi-run salt fingerprint\0" + job_id.encode() + b"\0" + salt
    return hashlib.sha256(material).hexdigest()[:16]


def handshake_fields(spec: JobSpec, plan: KeyPlan) -> dict[str, object]:
    """Fields the handshake compares besides the spec's own: the salt's fingerprint for each
    salted column that both parties hash themselves (a prehashed side holds no salt)."""
    if plan.salt is None:
        return {}
    columns = [
        c
        for c, steps in spec.normalize.items()
        if salted(steps) and not any(c in p.prehashed for p in spec.parties.values())
    ]
    if not columns:
        return {}
    fp = salt_fingerprint(spec.job_id, plan.salt)
    return {"salt": dict.fromkeys(columns, fp)}


# --- the steps ----------------------------------------------------------------------------


def _large(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return arr.cast(pa.large_string())


def apply_steps(
    column: pa.Array, steps: tuple[Step, ...], salt: bytes | None = None
) -> tuple[pa.Array, np.ndarray]:
    """(the normalised column, null where a step could not parse; rows empty after a step)."""
    value = _large(column)
    empty = np.zeros(len(value), dtype=bool)
    for step in steps:
        before = _is_empty(value)
        empty |= before  # counted before sha256 hides it
        value = _STEP[step.name](value, step, salt)
        if step.name in ("email", "e164") and before.any():
            # An empty value is empty, not unparseable.
            value = pc.if_else(pa.array(before), _const("", len(value)), value)
        empty |= _is_empty(value)
    return value, empty


def _is_empty(value: pa.Array) -> np.ndarray:
    lengths = pc.fill_null(pc.binary_length(value), 1)
    return np.asarray(pc.equal(lengths, 0).to_numpy(zero_copy_only=False), dtype=bool)


def _trim(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    return pc.utf8_trim_whitespace(v)


def _lower(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    return pc.utf8_lower(v)


def _upper(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    return pc.utf8_upper(v)


def _nfkc(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    # pyarrow 14's utf8_normalize decomposes but does not compose (its NFKC returns NFKD:
    # checked in the tests), so Python's unicodedata does it, for the non-ASCII values only
    # (NFKC leaves ASCII text as it is).
    other = pc.invert(pc.fill_null(pc.string_is_ascii(v), True))
    if not pc.any(other).as_py():
        return v
    texts = pc.filter(v, other).to_pylist()
    done = pa.array([unicodedata.normalize("NFKC", t) for t in texts], pa.large_string())
    return pc.replace_with_mask(v, other, done)


def _collapse_spaces(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    return pc.replace_substring_regex(v, _SPACES, " ")


def _digits_only(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    # On the bytes: in UTF-8 no byte of a multi-byte character is an ASCII digit, so keeping
    # the bytes 0x30-0x39 keeps exactly the digits. In slices of rows, so that the running
    # count of kept bytes stays small (a count per byte of 10M e-mails would be 2 GB).
    offsets, data = _buffers(v)
    raw = np.frombuffer(data, np.uint8)
    new_offsets = np.zeros(len(v) + 1, np.int64)
    parts = []
    for lo in range(0, len(v), _DIGITS_SLICE):
        hi = min(lo + _DIGITS_SLICE, len(v))
        a, b = int(offsets[lo]), int(offsets[hi])
        piece = raw[a:b]
        keep = (piece >= 0x30) & (piece <= 0x39)
        before = np.concatenate([[0], np.cumsum(keep, dtype=np.int64)])
        new_offsets[lo + 1 : hi + 1] = new_offsets[lo] + before[offsets[lo + 1 : hi + 1] - a]
        parts.append(piece[keep])
    text = np.concatenate(parts).tobytes() if parts else b""
    out = pa.LargeStringArray.from_buffers(
        len(v), pa.py_buffer(new_offsets.tobytes()), pa.py_buffer(text)
    )
    if v.null_count:
        return pc.if_else(pc.is_valid(v), out, pa.nulls(len(v), pa.large_string()))
    return out


def _email(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    v = pc.utf8_lower(pc.utf8_trim_whitespace(v))
    if step.gmail:
        local = pc.replace_substring_regex(v, r"@[^@]*$", "")
        local = pc.replace_substring(pc.replace_substring_regex(local, r"\+.*$", ""), ".", "")
        gmail = pc.binary_join_element_wise(local, _const("@gmail.com", len(v)), _const("", len(v)))
        v = pc.if_else(pc.match_substring_regex(v, _GMAIL), gmail, v)
    ok = pc.or_(pc.match_substring_regex(v, _EMAIL), pc.equal(pc.binary_length(v), 0))
    return pc.if_else(ok, v, pa.nulls(len(v), pa.large_string()))


def _e164(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    blank = pc.equal(pc.binary_length(pc.utf8_trim_whitespace(v)), 0)
    return pc.if_else(blank, _const("", len(v)), phones.e164_column(v, step.region))


def _sha256(v: pa.Array, step: Step, salt: bytes | None) -> pa.Array:
    return sha256_hex(v, salt if step.salt else None)


_STEP = {
    "trim": _trim,
    "lower": _lower,
    "upper": _upper,
    "nfkc": _nfkc,
    "collapse_spaces": _collapse_spaces,
    "digits_only": _digits_only,
    "email": _email,
    "e164": _e164,
    "sha256": _sha256,
}


def _const(text: str, n: int) -> pa.Array:
    raw = text.encode("utf-8")
    offsets = np.arange(n + 1, dtype=np.int64) * len(raw)
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(raw * n)
    )


def _buffers(arr: pa.Array) -> tuple[np.ndarray, bytes]:
    """(offsets relative to the first value, the values' bytes) of a large_string array."""
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    raw = arr.buffers()[2]
    start, end = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
    data = raw.to_pybytes()[start:end] if raw is not None else b""
    return offsets - start, data


def _hex_array(digests: np.ndarray, width: int, validity: pa.Array | None) -> pa.Array:
    """Lower-case hex strings of ``digests`` (rows of ``width`` bytes)."""
    n = len(digests)
    text = np.ascontiguousarray(digests).tobytes().hex().encode()  # one C call for all rows
    offsets = np.arange(n + 1, dtype=np.int64) * (2 * width)
    out = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(text))
    if validity is None:
        return out
    return pc.if_else(validity, out, pa.nulls(n, pa.large_string()))


def sha256_hex(column: pa.Array, salt: bytes | None = None, workers: int | None = None) -> pa.Array:
    """Lower-case hex SHA-256 of each value's UTF-8 bytes (after ``salt``); nulls stay null.

    A large column is hashed in ``workers`` processes (default: the cores this process may
    use)."""
    arr = _large(column)
    offsets, data = _buffers(arr)
    n = len(arr)
    workers = cores() if workers is None else workers
    if workers >= HASH_PARALLEL_CORES and n >= HASH_PARALLEL_FROM:
        chunks = []
        for lo in range(0, n, _HASH_CHUNK):
            hi = min(lo + _HASH_CHUNK, n)
            a, b = int(offsets[lo]), int(offsets[hi])
            chunks.append((data[a:b], (offsets[lo : hi + 1] - a).tolist(), salt))
        digests = b"".join(map_chunks(_hash_chunk, chunks, workers))
    else:
        digests = _hash_chunk((data, offsets.tolist(), salt))
    table = np.frombuffer(digests, np.uint8).reshape(-1, 32)
    return _hex_array(table, 32, pc.is_valid(arr) if arr.null_count else None)


def _hash_chunk(args: tuple[bytes, list[int], bytes | None]) -> bytes:
    """The 32-byte digests, one after the other, of the values at ``bounds`` in ``data``."""
    data, bounds, salt = args
    sha = hashlib.sha256
    if salt:
        return b"".join([sha(salt + data[a:b]).digest() for a, b in itertools.pairwise(bounds)])
    return b"".join([sha(data[a:b]).digest() for a, b in itertools.pairwise(bounds)])


def prehashed_column(column: pa.Array, kind: str) -> tuple[pa.Array, np.ndarray]:
    """A column of SHA-256 digests (``sha256_hex`` or ``sha256_base64``) as lower-case hex;
    null where a value is not one (wrong length or alphabet); rows empty in the file."""
    v = pc.utf8_trim_whitespace(_large(column))
    empty = _is_empty(v)
    if kind == "sha256_hex":
        v = pc.utf8_lower(v)
        ok = pc.match_substring_regex(v, r"^[0-9a-f]{64}$")
        return pc.if_else(ok, v, pa.nulls(len(v), pa.large_string())), empty
    # 32 bytes are 43 base64 characters and one "=" (standard or URL-safe alphabet).
    v = pc.replace_substring_regex(v, r"=$", "")
    ok = pc.match_substring_regex(v, r"^[A-Za-z0-9+/_-]{42}[AEIMQUYcgkosw048]$")
    good = pc.filter(v, ok)
    _, data = _buffers(good)
    sextets = _B64[np.frombuffer(data, np.uint8)].reshape(-1, 43).astype(np.uint32)
    sextets = np.concatenate([sextets, np.zeros((len(sextets), 1), np.uint32)], axis=1)
    quads = sextets.reshape(len(sextets), 11, 4)
    word = (quads[..., 0] << 18) | (quads[..., 1] << 12) | (quads[..., 2] << 6) | quads[..., 3]
    raw = np.stack([(word >> 16) & 255, (word >> 8) & 255, word & 255], axis=2)
    digests = raw.reshape(len(sextets), 33)[:, :32].astype(np.uint8)
    hexed = _hex_array(digests, 32, None)
    ok_np = np.asarray(ok.to_numpy(zero_copy_only=False), dtype=bool)
    index = np.where(ok_np, np.cumsum(ok_np) - 1, 0)
    taken = hexed.take(pa.array(index)) if len(hexed) else pa.nulls(len(v), pa.large_string())
    return pc.if_else(ok, taken, pa.nulls(len(v), pa.large_string())), empty


# --- a whole input ------------------------------------------------------------------------


def normalize_keys(table: pa.Table, plan: KeyPlan, where: str) -> Normalized:
    """Normalise every key column of ``table``; refuse or drop rows as ``on_invalid`` says."""
    n = table.num_rows
    columns: dict[str, pa.Array] = {}
    stats: dict[str, ColumnStats] = {}
    bad = np.zeros(n, dtype=bool)
    problems: list[tuple[str, int, int, int, int]] = []  # (column, invalid, first, empty, first)
    for key in plan.keys:
        raw = _large(table[key])
        if key in plan.prehashed:
            value, empty = prehashed_column(raw, plan.prehashed[key])
        elif key in plan.steps:
            value, empty = apply_steps(raw, plan.steps[key], plan.salt)
        else:
            columns[key] = raw
            continue
        invalid = np.asarray(pc.is_null(value).to_numpy(zero_copy_only=False), dtype=bool)
        empty &= ~invalid
        same = pc.fill_null(pc.equal(value, raw), True)
        changed = int(n - int(pc.sum(same).as_py() or 0))
        stats[key] = ColumnStats(changed, int(empty.sum()), int(invalid.sum()))
        log.info("key column %d: %d rows changed, %d empty, %d invalid",
                 plan.keys.index(key) + 1, changed, empty.sum(), invalid.sum())  # fmt: skip
        if invalid.any() or empty.any():
            problems.append((key, int(invalid.sum()), _first(invalid), int(empty.sum()),
                             _first(empty)))  # fmt: skip
        bad |= invalid | empty
        columns[key] = value
    keys = pa.table(columns)
    if not bad.any():
        return Normalized(keys, None, stats)
    if plan.on_invalid == "refuse":
        raise PreflightError(_refusal(where, problems, plan))
    kept = np.flatnonzero(~bad)
    keys = keys.filter(pa.array(~bad))
    if keys.num_rows == 0:
        raise PreflightError(
            f"{where}: no row is left after on_invalid: drop removed {n}; check the "
            "normalize steps against the file"
        )
    return Normalized(keys, kept, stats, dropped=int(bad.sum()))


def _first(mask: np.ndarray) -> int:
    """1-based number of the first row flagged (rows counted below the header), else 0."""
    hits = np.flatnonzero(mask)
    return int(hits[0]) + 1 if len(hits) else 0


def _refusal(where: str, problems: list[tuple[str, int, int, int, int]], plan: KeyPlan) -> str:
    key, invalid, first_invalid, empty, first_empty = problems[0]
    what = "are not phone numbers" if _has(plan, key, "e164") else "cannot be parsed"
    if key in plan.prehashed:
        what = f"are not {plan.prehashed[key].replace('_', ' ')}"
    parts = []
    if invalid:
        parts.append(f"{invalid} value(s) {what} (first: data row {first_invalid})")
    if empty:
        parts.append(f"{empty} became empty (first: data row {first_empty})")
    more = f"; other key columns have {len(problems) - 1} more such problems" * (len(problems) > 1)
    return (
        f"{where}: key column {cut(key, 30)}: {' and '.join(parts)}{more}; fix the input, or "
        "set on_invalid: drop in the spec to leave such rows out"
    )


def _has(plan: KeyPlan, key: str, name: str) -> bool:
    return any(s.name == name for s in plan.steps.get(key, ()))


def duplicate_rows(keys: pa.Table) -> tuple[int, int, int]:
    """(rows that repeat an earlier row's key, and an example pair of 0-based positions);
    (0, -1, -1) when every key is distinct."""
    names = keys.column_names
    if len(names) == 1:
        distinct = len(pc.unique(keys[names[0]].combine_chunks()))
    else:
        distinct = keys.group_by(names).aggregate([]).num_rows
    extra = keys.num_rows - distinct
    if extra == 0:
        return 0, -1, -1
    order = pc.sort_indices(keys, sort_keys=[(k, "ascending") for k in names])
    ordered = keys.take(order)
    same = None
    for k in names:
        col = ordered[k].combine_chunks()
        eq = pc.equal(col.slice(1), col.slice(0, len(col) - 1))
        same = eq if same is None else pc.and_(same, eq)
    at = int(np.flatnonzero(np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool))[0])
    pair = sorted((int(order[at].as_py()), int(order[at + 1].as_py())))
    return extra, pair[0], pair[1]
