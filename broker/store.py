"""Durable queues: a message the broker accepted is on disk until its delivery is confirmed.

The store is a log of *segment* files, ``<queue.store.dir>/log/<number>.seg``, written one
after the other: a message is a *put* record appended before its sender is answered OK, and
its confirmation (the consumer's next pop, the release of its session, the expiry of its
queue, or, in the outbox, the next hop's OK) is a small *delete* record. A segment whose puts
are all deleted is dropped once every older one is (so no delete record is lost before the
put it cancels); emptied segment files are kept (up to ``SPARE_SEGMENTS``) and written over
again, because writing into pages the file already has costs a tenth of growing a new file
(and a file per message cost a directory entry and an inode each: about 150 us under load).
When the segments hold much more than the live messages (more than twice as much, plus
``BEHIND_SEGMENTS`` segments) and the oldest is mostly confirmed, its live messages are written
again at the end of the log, so a message that is never confirmed holds back no more than a
few segments of disk.

A write that completed survives the broker process being killed (the data is in the kernel's
page cache); with ``queue.store.fsync = true`` it is also flushed to the disk before the
answer (``fdatasync``), and so survives a power loss.

Record layout (integers little-endian)::

    magic "PSIR" | kind u8 (1 put, 2 delete) | segment number u64 | message id u64 |
    header length u32 | payload length u64 | crc32 u32 | header | payload
    header: JSON {"session", "node", "topic", "metadata"} (put records only)

The CRC covers the fields before it, the header and the payload. A segment is read up to
the first place that holds no record of its own number (the end of what was written, or
older bytes of a reused file). A record of its number that is cut short or fails its CRC is
reported with the file and the offset where it breaks, the records after it are recovered
where they can be found, and the segment is moved to ``damaged/`` once its live messages
are written again. A ``LOCK`` file (``flock``) keeps two brokers from sharing one store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BrokerError

log = logging.getLogger("broker.store")

_MAGIC = b"PSIR"
_END = b"\0\0\0\0"  # written after the last record: where reading stops
_PUT, _DELETE = 1, 2
_RECORD = struct.Struct("<4sBQQIQI")  # magic, kind, segment, id, header len, payload len, crc
_CRC_AT = _RECORD.size - 4
_SUFFIX = ".seg"
_HEADER_MAX = 1 << 20
SEGMENT_BYTES = 8 << 20  # a segment takes records up to this size (a larger one alone)
SPARE_SEGMENTS = 2  # emptied segment files kept for reuse
BEHIND_SEGMENTS = 4  # a live segment this far behind the newest has its messages rewritten


@dataclass(frozen=True)
class StoredMessage:
    """One message read back from the store at start."""

    id: int
    session: str
    node: str
    topic: str
    metadata: dict[str, str]
    payload: bytes


class StoreDamage(Exception):
    """A stored record that cannot be read back; ``offset`` is where it breaks."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


@dataclass
class _Segment:
    number: int
    path: Path
    fd: int
    end: int = 0  # where the next record goes
    live: set[int] = field(default_factory=set)  # ids of the puts not deleted yet
    damaged: bool = False


class MessageStore:
    """The segment log of one broker, under an exclusive lock. Not thread-safe: one event
    loop uses it."""

    def __init__(self, folder: str | os.PathLike[str], fsync: bool = False) -> None:
        self.folder = Path(folder)
        self.fsync = fsync
        self.log_dir = self.folder / "log"
        self.damaged = self.folder / "damaged"
        self._segments: dict[int, _Segment] = {}  # oldest first
        self._spare: list[Path] = []
        self._where: dict[int, int] = {}  # message id -> its segment's number
        self._live: dict[int, StoredMessage] = {}  # what a rewrite needs (shares the payloads)
        self._sizes: dict[int, int] = {}
        self.bytes_live = 0  # record bytes of the messages not yet confirmed
        self._next_segment = 1
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None

    @property
    def bytes_on_disk(self) -> int:
        return sum(s.end for s in self._segments.values())

    def __len__(self) -> int:
        """Messages stored and not yet confirmed."""
        return len(self._where)

    def open(self) -> None:
        """Create the folders (0700) and take the lock; raise BrokerError if that fails."""
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.folder, 0o700)
            fd = os.open(self.folder / "LOCK", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise BrokerError(
                f"queue.store.dir {self.folder}: cannot use it ({exc.strerror}); "
                "point queue.store.dir at a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BrokerError(
                f"queue.store.dir {self.folder} is in use by another running broker; "
                "give each broker its own queue.store.dir"
            ) from None
        self._lock_fd = fd
        self._dir_fd = os.open(self.log_dir, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        for seg in self._segments.values():
            os.close(seg.fd)
        self._segments.clear()
        for fd in (self._dir_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._dir_fd = self._lock_fd = None

    # ---------------------------------------------------------------------------- writing

    def put(
        self,
        msg_id: int,
        session: str,
        node: str,
        topic: str,
        metadata: dict[str, str],
        payload: bytes,
    ) -> None:
        """Write one message; raise OSError (disk full, ...) leaving nothing readable."""
        self._put(StoredMessage(msg_id, session, node, topic, metadata, payload))
        self._tidy()

    def _put(self, message: StoredMessage) -> None:
        header = json.dumps(
            {
                "session": message.session,
                "node": message.node,
                "topic": message.topic,
                "metadata": message.metadata,
            },
            separators=(",", ":"),
        ).encode("utf-8")
        size = self._append(_PUT, message.id, header, message.payload)
        old = self._where.get(message.id)
        if old is not None and old in self._segments:  # written again (a rewrite)
            self._segments[old].live.discard(message.id)
            self.bytes_live -= self._sizes.get(message.id, 0)
        seg = self._active()
        seg.live.add(message.id)
        self._where[message.id] = seg.number
        self._live[message.id] = message
        self._sizes[message.id] = size
        self.bytes_live += size

    def delete(self, msg_id: int) -> None:
        """Forget a message whose delivery is confirmed (or whose queue is gone)."""
        number = self._where.pop(msg_id, None)
        if number is None:
            return
        self._live.pop(msg_id, None)
        self.bytes_live -= self._sizes.pop(msg_id, 0)
        seg = self._segments.get(number)
        if seg is not None:
            seg.live.discard(msg_id)
        try:
            # Not flushed even with fsync: lost in a power loss, it only means the message is
            # offered again, which does no harm (see broker.queues).
            self._append(_DELETE, msg_id, b"", b"", sync=False)
        except OSError as exc:  # keep serving; the message is only offered again after a restart
            log.error("store: cannot record the delivery of message %d: %s", msg_id, exc.strerror)
        self._tidy()

    def _active(self) -> _Segment:
        if not self._segments:
            return self._new_segment()
        return self._segments[next(reversed(self._segments))]

    def _append(
        self, kind: int, msg_id: int, header: bytes, payload: bytes, sync: bool = True
    ) -> int:
        size = _RECORD.size + len(header) + len(payload)
        seg = self._active()
        if seg.end and seg.end + size > SEGMENT_BYTES:
            seg = self._new_segment()
        prefix = _RECORD.pack(_MAGIC, kind, seg.number, msg_id, len(header), len(payload), 0)
        crc = zlib.crc32(payload, zlib.crc32(header, zlib.crc32(prefix[:_CRC_AT])))
        prefix = prefix[:_CRC_AT] + struct.pack("<I", crc)
        try:
            _write_all(seg.fd, [prefix, header, payload, _END], seg.end)
            if self.fsync and sync:
                os.fdatasync(seg.fd)
        except OSError:
            try:  # what did get written must not read as a record at the next start
                os.pwrite(seg.fd, _END, seg.end)
            except OSError:
                pass
            raise
        seg.end += size
        return size

    def _new_segment(self) -> _Segment:
        number = self._next_segment
        self._next_segment += 1
        path = self.log_dir / f"{number:016x}{_SUFFIX}"
        if self._spare:
            self._spare.pop().replace(path)  # its old records carry another number
            fd = os.open(path, os.O_RDWR)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        if self.fsync and self._dir_fd is not None:
            os.fsync(self._dir_fd)  # the new name, too, must reach the disk
        seg = self._segments[number] = _Segment(number, path, fd)
        return seg

    def _tidy(self) -> None:
        """Drop the oldest segments while they hold no live message. The live messages of
        the oldest are written again, so that it can go, when it is damaged, or when it holds
        back mostly confirmed ones: a backlog (the consumer is slow) is left where it is."""
        while len(self._segments) > 1:
            oldest = next(iter(self._segments.values()))
            if oldest.live:
                if not (oldest.damaged or self._held_back(oldest)):
                    return
                for msg_id in sorted(oldest.live):
                    self._put(self._live[msg_id])
                continue
            del self._segments[oldest.number]
            self._retire(oldest)

    def _held_back(self, oldest: _Segment) -> bool:
        if len(self._segments) <= BEHIND_SEGMENTS:
            return False
        if self.bytes_on_disk < 2 * self.bytes_live + BEHIND_SEGMENTS * SEGMENT_BYTES:
            return False
        return 2 * sum(self._sizes.get(i, 0) for i in oldest.live) < oldest.end

    def _retire(self, seg: _Segment) -> None:
        os.close(seg.fd)
        try:
            if seg.damaged:
                self.damaged.mkdir(exist_ok=True, mode=0o700)
                seg.path.replace(self.damaged / seg.path.name)
            elif len(self._spare) < SPARE_SEGMENTS and seg.end <= SEGMENT_BYTES:
                spare = self.log_dir / f"spare-{seg.number:016x}"
                seg.path.replace(spare)
                self._spare.append(spare)
            else:
                seg.path.unlink()
        except OSError as exc:
            log.error("store: cannot remove %s (%s)", seg.path, exc.strerror)

    # ---------------------------------------------------------------------------- reading

    def recover(self) -> Iterator[StoredMessage]:
        """Every message not confirmed before the last stop, oldest first; damaged records
        are reported (file and offset) and the rest recovered."""
        numbered = []
        for path in sorted(self.log_dir.iterdir()):
            if path.name.startswith("spare-"):
                self._spare.append(path)
                continue
            number = _number_of(path.name)
            if number is None:
                log.warning("store: %s is not a segment file; left alone", path)
                continue
            numbered.append((number, path))
        numbered.sort()
        live: dict[int, tuple[StoredMessage, int, int]] = {}  # id -> (message, segment, size)
        for number, path in numbered:
            try:
                fd = os.open(path, os.O_RDWR)
            except OSError as exc:
                log.error("store: cannot open %s (%s); skipped", path, exc.strerror)
                continue
            seg = self._segments[number] = _Segment(number, path, fd)
            self._next_segment = max(self._next_segment, number + 1)
            for kind, offset, size, message in self._scan(seg):
                if kind == _PUT and message is not None:
                    live[message.id] = (message, number, size)
                else:
                    live.pop(offset, None)  # a delete record: ``offset`` holds the id
        legacy = self._legacy_files()
        for msg_id in sorted(live):
            message, number, size = live[msg_id]
            self._segments[number].live.add(msg_id)
            self._where[msg_id] = number
            self._live[msg_id] = message
            self._sizes[msg_id] = size
            self.bytes_live += size
        # New records go to a new segment: the last one may end in a torn record.
        self._new_segment()
        self._tidy()
        for path, message in legacy:  # written into the log first, then removed
            if message.id not in self._where:
                self._put(message)
                live[message.id] = (message, 0, 0)
            path.unlink()
        if legacy:
            log.info(
                "store: %d message file(s) of the earlier layout moved into the log", len(legacy)
            )
            try:
                (self.folder / "msgs").rmdir()
            except OSError:
                pass
        for msg_id in sorted(live):
            yield live[msg_id][0]

    def _legacy_files(self) -> list[tuple[Path, StoredMessage]]:
        """Messages a broker before the segment log left as one file each in ``msgs/``."""
        folder = self.folder / "msgs"
        if not folder.is_dir():
            return []
        out = []
        for path in sorted(folder.glob("*.msg")):
            try:
                out.append((path, _read_legacy(path)))
            except (OSError, ValueError) as exc:
                log.error("store: %s is damaged (%s); moved to %s", path, exc, self.damaged)
                try:
                    self.damaged.mkdir(exist_ok=True, mode=0o700)
                    path.replace(self.damaged / path.name)
                except OSError:
                    pass
        return out

    def _scan(self, seg: _Segment) -> Iterator[tuple[int, int, int, StoredMessage | None]]:
        """(kind, offset or id, record size, message) of each record of ``seg``; a delete
        record gives its message id in place of the offset."""
        try:
            data = _read_all(seg.fd)
        except OSError as exc:
            log.error("store: cannot read %s (%s); skipped", seg.path, exc.strerror)
            return
        pos = 0
        while pos < len(data):
            head = data[pos : pos + 4]
            if head == _END:
                break  # the end of what was written (a reused file has older bytes after it)
            if len(data) - pos < _RECORD.size or head != _MAGIC:
                self._damaged(seg, StoreDamage("not a record of this store", pos))
                break
            _magic, kind, number, msg_id, header_len, payload_len, crc = _RECORD.unpack_from(
                data, pos
            )
            if number != seg.number:
                break  # a record of the file's earlier use, never overwritten
            end = pos + _RECORD.size + header_len + payload_len
            if kind not in (_PUT, _DELETE) or header_len > _HEADER_MAX or end > len(data):
                what = "cut short" if end > len(data) else "not a record of this store"
                self._damaged(seg, StoreDamage(what, pos))
                break
            view = memoryview(data)
            body = view[pos + _RECORD.size : end]
            try:
                if zlib.crc32(body, zlib.crc32(view[pos : pos + _CRC_AT])) != crc:
                    raise StoreDamage("checksum mismatch", pos)
                if kind == _DELETE:
                    yield _DELETE, msg_id, end - pos, None
                else:
                    yield _PUT, pos, end - pos, _message(msg_id, body, header_len, pos)
            except StoreDamage as exc:  # the lengths held: the records after it are read
                self._damaged(seg, exc)
            pos = end
        seg.end = pos

    @staticmethod
    def _damaged(seg: _Segment, exc: StoreDamage) -> None:
        seg.damaged = True
        log.error(
            "store: %s is damaged at offset %d (%s); the other messages are recovered",
            seg.path,
            exc.offset,
            exc.reason,
        )


def _message(msg_id: int, body: memoryview, header_len: int, pos: int) -> StoredMessage:
    try:
        header = json.loads(bytes(body[:header_len]).decode("utf-8"))
        fields = (header["session"], header["node"], header["topic"])
        metadata = header["metadata"]
        if not all(isinstance(f, str) for f in fields) or not isinstance(metadata, dict):
            raise ValueError("wrong field types")
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreDamage(f"unreadable header ({exc})", pos) from None
    return StoredMessage(
        msg_id,
        *fields,
        {str(k): str(v) for k, v in metadata.items()},
        bytes(body[header_len:]),
    )


_LEGACY = struct.Struct("<4sBIQI")  # magic "PSIQ", version 1, header len, payload len, crc32


def _read_legacy(path: Path) -> StoredMessage:
    """One message file of the earlier layout (a file per message); ValueError if damaged."""
    data = path.read_bytes()
    if len(data) < _LEGACY.size:
        raise ValueError(f"cut short at offset {len(data)}")
    magic, version, header_len, payload_len, crc = _LEGACY.unpack_from(data)
    end = _LEGACY.size + header_len + payload_len
    if magic != b"PSIQ" or version != 1 or len(data) != end:
        raise ValueError("not a message file of the earlier layout, or cut short")
    body = memoryview(data)[_LEGACY.size :]
    if zlib.crc32(body) != crc:
        raise ValueError(f"checksum mismatch at offset {_LEGACY.size}")
    msg_id = int(path.stem, 16)
    try:
        return _message(msg_id, body, header_len, _LEGACY.size)
    except StoreDamage as exc:
        raise ValueError(exc.reason) from None


def _number_of(name: str) -> int | None:
    if not name.endswith(_SUFFIX):
        return None
    try:
        return int(name[: -len(_SUFFIX)], 16)
    except ValueError:
        return None


def _write_all(fd: int, parts: list[bytes], offset: int) -> None:
    views = [memoryview(p) for p in parts if p]
    while views:
        written = os.pwritev(fd, views, offset)
        if written <= 0:
            raise OSError(28, "No space left on device")
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks, offset = [], 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
