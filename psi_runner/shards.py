"""Sharded jobs: the input split by a keyed hash of the canonical key, K results merged into one.

Both parties put a row into shard ``h(canonical key) mod K``, where ``h`` is keyed by a secret
derived from both runs' handshake nonces (``shard_key``): equal keys land in the same shard on
both sides, so the union of the K shard intersections is the intersection, and neither side
could choose the key to steer particular values into a shard. Shard i of alice meets shard i
of bob in an ordinary SPU PSI on a link session of its own (``shard_session``).

**Splitting** streams: a file SPU reads as it is is copied line by line (raw bytes, the header
on top of every part) in chunks of a few MB; a canonical-key input is written slice by slice
as (canonical key, row) files whose row numbers are the whole input's. Memory stays at one
chunk or slice beside what preflight already holds.

**Merging** gives the bytes SPU would have written for the unsharded run. SPU's v2 output
(checked with real runs) is made of blocks, each sorted by the key field's raw text, byte by
byte: the intersection, then the left side's unmatched rows, then the right side's (a join
keeps only its blocks; a non-receiving side's rows are all-NULL lines). Every block of a shard
is therefore a sorted run of the unsharded block: the merge stable-sorts each block's lines of
all shards by the key field, and all-NULL lines are the same everywhere so only their number
counts. Block sizes follow from SPU's intersection count and the shard's own row count.

Every part file holds one extra row (``sentinel``), because SPU refuses an empty input and a
shard may be empty on either side; it only ever lands in its own side's unmatched block, and
the merge leaves it out (and the peer's all-NULL line for it).
"""

from __future__ import annotations

import hashlib
import logging
import os
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from . import data
from .backends.calls import PsiCall
from .spec import JobSpec

log = logging.getLogger("psi_runner.shards")

_POSITIONS = 64  # byte positions of the tabulation table (later bytes rotate it)
_COLUMNS = 256  # strings up to this long are hashed position by position
_SLICE_ROWS = 1 << 18  # canonical keys hashed and written at a time
_CHUNK_BYTES = 8 << 20  # raw file read at a time
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def shard_session(session: str, index: int) -> str:
    """The link session of shard ``index`` (both sides derive it from the agreed session)."""
    return f"{session}-shard{index}"


def shard_key(nonce: str, peer_nonce: str) -> bytes:
    """The hash key of a sharded run: from both sides' random handshake nonces, in an order
    both sides see alike. It is never logged or written."""
    pair = "|".join(sorted([nonce, peer_nonce])).encode()
    return hashlib.blake2b(pair, key=b"psi-run shards", digest_size=32).digest()


@dataclass
class ShardHash:
    """A keyed tabulation hash of byte strings, vectorised with numpy."""

    key: bytes
    table: np.ndarray = field(init=False, repr=False)  # (_POSITIONS, 256) uint64
    lengths: np.ndarray = field(init=False, repr=False)  # (256,) uint64

    def __post_init__(self) -> None:
        raw = hashlib.shake_256(self.key).digest(8 * 256 * (_POSITIONS + 1))
        words = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
        self.table = words[: 256 * _POSITIONS].reshape(_POSITIONS, 256)
        self.lengths = words[256 * _POSITIONS :]

    def __repr__(self) -> str:  # the key is secret
        return "ShardHash(<key>)"

    def shards(
        self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray, k: int
    ) -> np.ndarray:
        """The shard (0..k-1) of each byte string ``buf[starts[i]:starts[i]+lengths[i]]``.

        The hash: the length's word XOR, over the positions j, the table's word for (j mod 64,
        the byte at j), rotated left by ``_turn(j)``; then ``_mix``."""
        starts = starts.astype(np.int64)
        lengths = lengths.astype(np.int64)
        h = self.lengths[lengths & 255].copy()
        long = lengths > _COLUMNS
        short = np.flatnonzero(~long) if long.any() else None
        if short is None:
            h ^= self._by_column(buf, starts, lengths)
        else:
            h[short] ^= self._by_column(buf, starts[short], lengths[short])
            rest = np.flatnonzero(long)
            h[rest] ^= self._by_byte(buf, starts[rest], lengths[rest])
        return (_mix(h) % np.uint64(k)).astype(np.int64)

    def _by_column(self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The XOR part for short strings, one byte position at a time over all of them."""
        acc = np.zeros(len(starts), dtype=np.uint64)
        if not len(starts) or not len(buf):
            return acc
        top = len(buf) - 1
        for j in range(int(lengths.max())):
            word = _rotated(self.table[j % _POSITIONS], _turn(j))[buf[np.minimum(starts + j, top)]]
            acc ^= np.where(lengths > j, word, np.uint64(0))
        return acc

    def _by_byte(self, buf: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The XOR part for long strings, over all their bytes at once."""
        n, total = len(starts), int(lengths.sum())
        first = np.cumsum(lengths) - lengths
        row = np.repeat(np.arange(n, dtype=np.int64), lengths)
        pos = np.arange(total, dtype=np.int64) - first[row]
        word = self.table[pos % _POSITIONS, buf[starts[row] + pos]]
        turn = np.where(pos >= _POSITIONS, (pos // _POSITIONS) % 63 + 1, 0).astype(np.uint64)
        late = turn > 0
        w, t = word[late], turn[late]
        word[late] = (w << t) | (w >> (np.uint64(64) - t))
        return np.bitwise_xor.reduceat(word, first)


def _turn(j: int) -> int:
    """How far the word of byte position ``j`` is rotated (bytes beyond the table's 64
    positions are rotated, so that equal bytes 64 positions apart do not cancel)."""
    return (j // _POSITIONS) % 63 + 1 if j >= _POSITIONS else 0


def _rotated(words: np.ndarray, t: int) -> np.ndarray:
    if not t:
        return words
    return (words << np.uint64(t)) | (words >> np.uint64(64 - t))


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (h ^ (h >> np.uint64(31))) & _M64


@dataclass
class ShardedCall:
    """The parts of a sharded PSI, and the call whose output receives the merged result."""

    whole: PsiCall
    parts: list[PsiCall]
    rows: list[int]  # this side's rows in each shard


def sentinel(party: str) -> bytes:
    """The key of the extra row every part file of ``party`` gets: SPU refuses an empty
    input, and a shard may be empty on either side. It starts with a control byte, which no
    key SPU compares can hold (those are printable ASCII), so it never meets a real key or
    the peer's sentinel; it sorts first and the merge drops it."""
    return b"\x01psi-run-" + hashlib.sha256(party.encode()).hexdigest()[:16].encode()


def split(
    inp: data.InputTable, spec: JobSpec, party: str, folder: Path, key: bytes, output: Path
) -> ShardedCall:
    """Write this side's K part files into ``folder`` (private); the calls that read them."""
    k = spec.shards
    hasher = ShardHash(key)
    mark = sentinel(party)
    parts = [folder / f"shard{i}" for i in range(k)]
    for p in parts:
        p.mkdir(mode=0o700)
    inputs = [p / "spu_input.csv" for p in parts]
    if inp.plain:
        assert isinstance(inp.path, Path)
        rows = _split_file(inp.path, inputs, hasher, mark, quoted=inp.keys_quoted)
        keys: tuple[str, ...] = spec.keys
        whole_input = inp.path
    else:
        rows = _split_canonical(inp, spec.keys, inputs, hasher, mark)
        keys = (data.KEY_COLUMN,)
        whole_input = folder / "spu_input.csv"  # not written: the parts hold the rows
    calls = [PsiCall(i, p / "spu_output.csv", keys, scratch=p) for i, p in zip(inputs, parts)]
    whole = PsiCall(whole_input, output, keys, scratch=folder)
    return ShardedCall(whole, calls, rows)


def _split_canonical(
    inp: data.InputTable, keys: tuple[str, ...], dests: list[Path], hasher: ShardHash, mark: bytes
) -> list[int]:
    """(canonical key, row) files, one per shard; the row numbers are the whole input's."""
    table = inp.key_table(keys)
    k = len(dests)
    rows = [0] * k
    with ExitStack() as stack:
        handles = [stack.enter_context(open(d, "wb")) for d in dests]
        for fh in handles:
            fh.write(f"{data.KEY_COLUMN},{data.ROW_COLUMN}\n".encode())
            fh.write(mark + b",-1\n")
        for start in range(0, table.num_rows, _SLICE_ROWS):
            piece = table.slice(start, _SLICE_ROWS)
            ck = data.canonical_keys(piece, keys)
            ck = ck.cast(pa.large_string()) if ck.type != pa.large_string() else ck
            n = len(ck)
            offsets = np.frombuffer(ck.buffers()[1], dtype=np.int64)[ck.offset : ck.offset + n + 1]
            raw = ck.buffers()[2]
            buf = np.frombuffer(raw, np.uint8) if raw is not None else np.zeros(0, np.uint8)
            shard = hasher.shards(buf, offsets[:-1], np.diff(offsets), k)
            positions = np.arange(start, start + n, dtype=np.int64)
            t = pa.table({data.KEY_COLUMN: ck, data.ROW_COLUMN: positions})
            for i in range(k):
                mask = shard == i
                count = int(mask.sum())
                if count:
                    rows[i] += count
                    pcsv.write_csv(
                        t.filter(pa.array(mask)),
                        handles[i],
                        pcsv.WriteOptions(quoting_style="none", include_header=False),
                    )
    return rows


def _split_file(
    path: Path, dests: list[Path], hasher: ShardHash, mark: bytes, quoted: bool
) -> list[int]:
    """A file SPU reads as it is, line by line into the parts (its header on top of each).

    Such a file has one row per line, its key first and no comma inside a key; with
    ``quoted`` every key is in quotes, which are syntax and not hashed."""
    k = len(dests)
    rows = [0] * k
    with ExitStack() as stack:
        handles = [stack.enter_context(open(d, "wb")) for d in dests]
        with open(path, "rb") as src:
            header = src.readline()
            if not header.endswith(b"\n"):
                header += b"\n"
            q = b'"' if quoted else b""
            line = q + mark + q + b"," * header.count(b",") + b"\n"
            for fh in handles:
                fh.write(header + line)
            rest = b""
            while True:
                chunk = src.read(_CHUNK_BYTES)
                block = rest + chunk
                if not chunk:
                    if block and not block.endswith(b"\n"):
                        block += b"\n"
                    rest = b""
                else:
                    cut = block.rfind(b"\n") + 1
                    block, rest = block[:cut], block[cut:]
                if block:
                    _split_lines(block, handles, rows, hasher, quoted)
                if not chunk:
                    break
    return rows


def _line_bounds(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start of every line and end of its first field (each line ends with a newline)."""
    ends = np.flatnonzero(buf == 0x0A)
    starts = np.concatenate(([0], ends[:-1] + 1)).astype(np.int64)
    commas = np.flatnonzero(buf == 0x2C)
    if not len(commas):  # one column
        return starts, ends.astype(np.int64)
    at = np.searchsorted(commas, starts)
    comma = np.where(at < len(commas), commas[np.minimum(at, len(commas) - 1)], -1)
    field_end = np.where((comma >= 0) & (comma < ends), comma, ends)
    return starts, field_end.astype(np.int64)


def _split_lines(
    block: bytes, handles: list, rows: list[int], hasher: ShardHash, quoted: bool
) -> None:
    buf = np.frombuffer(block, np.uint8)
    starts, field_end = _line_bounds(buf)
    q = 1 if quoted else 0
    shard = hasher.shards(buf, starts + q, field_end - starts - 2 * q, len(handles))
    lines = _lines_array(block, starts)
    for i, fh in enumerate(handles):
        mask = shard == i
        count = int(mask.sum())
        if count:
            rows[i] += count
            fh.write(_joined(lines.filter(pa.array(mask))))


def _lines_array(block: bytes | pa.Buffer, starts: np.ndarray) -> pa.Array:
    """The lines of ``block`` (each with its newline) as a binary array, without a copy."""
    offsets = np.append(starts, len(block)).astype(np.int64)
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(starts), [None, pa.py_buffer(offsets), pa.py_buffer(block)]
    )


def _joined(lines: pa.Array) -> bytes | pa.Buffer:
    """The bytes of a binary array's values, back to back (lines keep their newlines)."""
    if isinstance(lines, pa.ChunkedArray):
        lines = lines.combine_chunks()
    if not len(lines):
        return b""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int64)
    first, last = int(offsets[lines.offset]), int(offsets[lines.offset + len(lines)])
    return lines.buffers()[2][first:last]


# -- merging ------------------------------------------------------------------------------


@dataclass
class ShardOutput:
    """One shard's SPU output at this party and what its blocks hold."""

    path: Path
    own_rows: int  # this side's rows in the shard
    intersection: int  # SPU's intersection count of the shard (-1: not told)


def blocks(spec: JobSpec, party: str) -> list[str]:
    """SPU's output blocks in order, each "inter", "own" or "peer" for ``party``."""
    if spec.join == "inner":
        return ["inter"]
    left_is_me = spec.left_side == party
    out = [] if spec.join == "difference" else ["inter"]
    if spec.join in ("left", "full", "difference"):
        out.append("own" if left_is_me else "peer")
    if spec.join in ("right", "full", "difference"):
        out.append("peer" if left_is_me else "own")
    return out


def merge(spec: JobSpec, party: str, outputs: list[ShardOutput], dest: Path) -> int:
    """Write into ``dest`` the output SPU would have written unsharded; its data rows."""
    order = blocks(spec, party)
    header = b""
    parts: dict[str, list[pa.Array]] = {name: [] for name in order}
    null_line = b""
    for out in outputs:
        raw = out.path.read_bytes() if out.path.exists() else b""
        if not raw:
            continue
        if not raw.endswith(b"\n"):
            raw += b"\n"
        cut = raw.find(b"\n") + 1
        header = header or raw[:cut]
        body = raw[cut:]
        if not body:
            continue
        buf = np.frombuffer(body, np.uint8)
        starts = np.concatenate(([0], np.flatnonzero(buf == 0x0A)[:-1] + 1)).astype(np.int64)
        lines = _lines_array(body, starts)
        for name, (a, b) in zip(order, _block_bounds(order, out, len(lines))):
            if name == "own":  # without our sentinel
                first = buf[starts[a:b]]
                second = buf[np.minimum(starts[a:b] + 1, len(buf) - 1)]
                keep = ~((first == 1) | ((first == 0x22) & (second == 1)))
                parts[name].append(lines.slice(a, b - a).filter(pa.array(keep)))
            elif name == "peer" and b > a:  # the peer's sentinel is one of its NULL lines
                parts[name].append(lines.slice(a + 1, b - a - 1))
                null_line = null_line or lines[a].as_py()
            elif b > a:
                parts[name].append(lines.slice(a, b - a))
    total = 0
    tmp = dest.with_name(dest.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(header)
        for name in order:
            pieces = parts[name]
            count = sum(len(p) for p in pieces)
            total += count
            if name == "peer":  # all-NULL lines: only their number counts
                fh.write(null_line * count)
                continue
            if not pieces:
                continue
            lines = pa.concat_arrays(pieces)
            fh.write(_joined(_sorted_by_key(lines)))
    os.replace(tmp, dest)
    return total


def _block_bounds(order: list[str], out: ShardOutput, n: int) -> list[tuple[int, int]]:
    """Line ranges of each block in one shard's output (``n`` data lines)."""
    if order == ["inter"]:
        return [(0, n)]
    inter = max(out.intersection, 0)
    own = out.own_rows + 1 - inter  # with our sentinel
    sizes = {"inter": inter, "own": own}
    sizes["peer"] = n - sum(sizes[b] for b in order if b != "peer")
    if out.intersection < 0 or min(sizes[b] for b in order) < 0:
        raise ValueError(
            f"shard output {out.path.name}: {n} lines do not fit the join's blocks "
            f"(intersection {out.intersection}, own rows {out.own_rows})"
        )
    bounds, at = [], 0
    for b in order:
        bounds.append((at, at + sizes[b]))
        at += sizes[b]
    return bounds


def _sorted_by_key(lines: pa.Array) -> pa.Array:
    """Lines stably sorted by their first field's raw bytes (SPU's order)."""
    text = lines.cast(pa.large_string())
    first = pc.list_element(pc.split_pattern(text, ",", max_splits=1), 0)
    # A line without a comma keeps its newline in the field: "\n" sorts before every key
    # byte, so the order is the key's.
    index = pc.sort_indices(pa.table({"k": first.cast(pa.large_binary())}), [("k", "ascending")])
    return lines.take(index)
