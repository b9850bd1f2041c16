"""How a single key column's non-plain values are written for SPU: the key code.

A canonical key (``data``) leaves a plain value (printable ASCII without quote, comma or
``~``) as it is and marks every other value with a leading ``~``. Two codes write the rest:

* ``hex``: ``~`` + the hex of the value's UTF-8 bytes (twice as long; the only code of
  earlier versions, and still the one for several key columns, shards and unbalanced PSI);
* ``escape``: ``~`` + the value itself, each byte that SPU's CSV handling or its sort could
  misread (quote, comma, ``~``, control characters and DEL) written as ``~`` + two hex
  digits; every other byte, UTF-8 above ASCII included, stays. ``id,1`` becomes ``~id~2c1``.

Both are injective: an encoded value starts with ``~``, which no plain value holds, and in
``escape`` every ``~`` after the first starts an escape (a ``~`` of the value is escaped
itself). ``escape`` keeps SPU's input about as long as the user's file: SPU sorts it with
GNU sort, reads it bucket by bucket and copies its lines, so every byte counts (10M awkward
keys: SPU's PSI call 32-34 s on hex keys against 28 s on the original file).

Both parties must write the same code: each says in the handshake which codes it knows
(``CODES``), and ``agreed_code`` picks ``escape`` only when both know it (a peer of an
earlier version says nothing and gets ``hex``).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

HEX, ESCAPE = "hex", "escape"
CODES = (HEX, ESCAPE)  # what this version can write, told to the peer

_ESCAPED = np.zeros(256, dtype=bool)  # the bytes ``escape`` writes as ``~XX``
_ESCAPED[:0x20] = True
_ESCAPED[0x7F] = True
_ESCAPED[[ord('"'), ord(","), ord("~")]] = True
_HEX = np.array([list(f"{i:02x}".encode()) for i in range(256)], dtype=np.uint8)
_TILDE = ord("~")


def agreed_code(keys: tuple[str, ...], peer_codes: object) -> str:
    """The code both parties use: ``escape`` for one key column when the peer knows it."""
    if len(keys) == 1 and isinstance(peer_codes, list) and ESCAPE in peer_codes:
        return ESCAPE
    return HEX


def tilde_escape(arr: pa.Array) -> pa.Array:
    """``~`` and each value with its ``_ESCAPED`` bytes as ``~XX`` (large_string, no nulls),
    vectorised over the bytes: no Python loop over rows."""
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    first, last = (int(offsets[0]), int(offsets[-1])) if n else (0, 0)
    raw = arr.buffers()[2]
    body = np.frombuffer(raw, dtype=np.uint8)[first:last] if raw is not None and n else None
    if body is None or not len(body):  # empty values only: each becomes "~"
        ends = np.arange(n + 1, dtype=np.int64)
        return pa.LargeStringArray.from_buffers(
            n, pa.py_buffer(ends.tobytes()), pa.py_buffer(b"~" * n)
        )
    # Few bytes need an escape: put "~" on each escaped byte and insert its two hex digits
    # after it, and a "~" before each value (np.insert is one pass over the bytes; equal
    # insertion points keep the order given: a value's digits before the next value's "~").
    at = np.flatnonzero(_ESCAPED[body])
    digits = _HEX[body[at]]
    marked = body.copy()
    marked[at] = _TILDE
    starts = offsets - first
    where = np.concatenate([at + 1, at + 1, starts[:-1]])
    what = np.concatenate([digits[:, 0], digits[:, 1], np.full(n, _TILDE, dtype=np.uint8)])
    out = np.insert(marked, where, what)
    # value i moves right by the "~" of the values up to it and two digits per escape before it
    before = np.searchsorted(at, starts, side="left")
    new_offsets = starts + np.arange(n + 1, dtype=np.int64) + 2 * before
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(new_offsets.tobytes()), pa.py_buffer(out.tobytes())
    )


_UNHEX = np.full(256, 0, dtype=np.uint8)  # a hex digit's value (only digits are looked up)
_UNHEX[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10, dtype=np.uint8)
_UNHEX[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16, dtype=np.uint8)


def tilde_unescape(arr: pa.Array) -> pa.Array:
    """The values that ``escape`` canonical keys stand for (large_string): a plain key as it
    is, an encoded one without its leading ``~`` and with each ``~XX`` as the byte XX.

    The result check uses it to take the result's keys from SPU's own output instead of
    keeping a copy of every key while SPU runs. Vectorised like ``tilde_escape``. A plain key
    holds no ``~``, so every ``~`` is either an encoded key's first byte or an escape."""
    arr = arr.cast(pa.large_string())
    n = len(arr)
    if not n:
        return arr
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    first = int(offsets[0])
    raw = arr.buffers()[2]
    body = np.frombuffer(raw, dtype=np.uint8)[first : int(offsets[-1])] if raw else None
    starts = offsets - first
    if body is None or not len(body):
        return arr
    tildes = np.flatnonzero(body == _TILDE)
    leading = np.zeros(len(tildes), dtype=bool)
    at_start = np.searchsorted(tildes, starts[:-1])  # the first "~" at or after each value
    has = at_start < len(tildes)
    hit = at_start[has][tildes[at_start[has]] == starts[:-1][has]]
    leading[hit] = True
    escapes = tildes[~leading]
    if len(escapes) and escapes[-1] + 2 >= len(body):
        raise ValueError("a canonical key ends inside an escape")
    out = body.copy()
    out[escapes] = (_UNHEX[body[escapes + 1]] << 4) | _UNHEX[body[escapes + 2]]
    dropped = np.concatenate([tildes[leading], escapes + 1, escapes + 2])
    dropped.sort()
    keep = np.ones(len(body), dtype=bool)
    keep[dropped] = False
    new_offsets = starts - np.searchsorted(dropped, starts, side="left")
    return pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(new_offsets.tobytes()), pa.py_buffer(out[keep].tobytes())
    )
