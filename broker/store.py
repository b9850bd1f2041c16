"""Durable queues: a message the broker accepted is a file until its delivery is confirmed.

One file per message, ``<queue.store.dir>/msgs/<id>.msg``, written before the sender is
answered OK and removed once the consumer has confirmed it (its next pop on the same queue),
when its session is released, or when its queue expires. A write that completed survives the
broker process being killed (the data is in the kernel's page cache); with
``queue.store.fsync = true`` it is also flushed to the disk before the answer, and so survives
a power loss.

File layout (all integers little-endian)::

    magic "PSIQ" | version u8 | header length u32 | payload length u64 | crc32 u32
    header: JSON {"session", "node", "topic", "metadata"} | payload

The CRC covers header and payload. At start every file is read back: a file cut short (the
broker died while writing it; its sender was never answered OK) or failing its CRC is reported
with its name and the offset where it breaks, moved to ``damaged/``, and the rest is recovered.
A ``LOCK`` file (``flock``) keeps two brokers from sharing one store.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import BrokerError

log = logging.getLogger("broker.store")

_MAGIC = b"PSIQ"
_VERSION = 1
_PREFIX = struct.Struct("<4sBIQI")  # magic, version, header length, payload length, crc32
_SUFFIX = ".msg"
_HEADER_MAX = 1 << 20


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
    """A stored file that cannot be read back; ``offset`` is where it breaks."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


class MessageStore:
    """The message files of one broker, under an exclusive lock."""

    def __init__(self, folder: str | os.PathLike[str], fsync: bool = False) -> None:
        self.folder = Path(folder)
        self.fsync = fsync
        self.msgs = self.folder / "msgs"
        self.damaged = self.folder / "damaged"
        self.bytes_on_disk = 0
        self._sizes: dict[int, int] = {}
        self._lock_fd: int | None = None
        self._dir_fd: int | None = None

    def open(self) -> None:
        """Create the folders (0700) and take the lock; raise ConfigError if that fails."""
        try:
            self.msgs.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        self._dir_fd = os.open(self.msgs, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        for fd in (self._dir_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._dir_fd = self._lock_fd = None

    def _path(self, msg_id: int) -> Path:
        return self.msgs / f"{msg_id:016x}{_SUFFIX}"

    def put(
        self,
        msg_id: int,
        session: str,
        node: str,
        topic: str,
        metadata: dict[str, str],
        payload: bytes,
    ) -> None:
        """Write one message; raise OSError (disk full, ...) leaving no file behind."""
        header = json.dumps(
            {"session": session, "node": node, "topic": topic, "metadata": metadata},
            separators=(",", ":"),
        ).encode("utf-8")
        crc = zlib.crc32(payload, zlib.crc32(header))
        prefix = _PREFIX.pack(_MAGIC, _VERSION, len(header), len(payload), crc)
        path = self._path(msg_id)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, [prefix, header, payload])
            if self.fsync:
                os.fsync(fd)
        except OSError:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        os.close(fd)
        if self.fsync and self._dir_fd is not None:
            os.fsync(self._dir_fd)  # the new name, too, must reach the disk
        size = _PREFIX.size + len(header) + len(payload)
        self.bytes_on_disk += size - self._sizes.get(msg_id, 0)
        self._sizes[msg_id] = size

    def delete(self, msg_id: int) -> None:
        """Forget a message whose delivery is confirmed (or whose queue is gone)."""
        size = self._sizes.pop(msg_id, None)
        if size is None:
            return
        self.bytes_on_disk -= size
        try:
            self._path(msg_id).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:  # keep serving; the file is only reread at the next start
            log.error("store: cannot remove %s: %s", self._path(msg_id), exc.strerror)

    def recover(self) -> Iterator[StoredMessage]:
        """Every readable stored message, oldest first; damaged files are reported and moved."""
        names = sorted(p.name for p in self.msgs.iterdir())
        for name in names:
            path = self.msgs / name
            msg_id = _id_of(name)
            if msg_id is None:
                log.warning("store: %s is not a message file; left alone", path)
                continue
            try:
                message = _read(path, msg_id)
            except StoreDamage as exc:
                self._set_aside(path, exc)
                continue
            except OSError as exc:
                log.error("store: cannot read %s (%s); skipped", path, exc.strerror)
                continue
            size = path.stat().st_size
            self._sizes[msg_id] = size
            self.bytes_on_disk += size
            yield message

    def _set_aside(self, path: Path, exc: StoreDamage) -> None:
        log.error(
            "store: %s is damaged at offset %d (%s); moved to %s, the other messages are recovered",
            path,
            exc.offset,
            exc.reason,
            self.damaged,
        )
        try:
            self.damaged.mkdir(exist_ok=True, mode=0o700)
            path.replace(self.damaged / path.name)
        except OSError as err:
            log.error("store: cannot move %s aside (%s); removing it", path, err.strerror)
            path.unlink(missing_ok=True)


def _id_of(name: str) -> int | None:
    if not name.endswith(_SUFFIX):
        return None
    try:
        return int(name[: -len(_SUFFIX)], 16)
    except ValueError:
        return None


def _write_all(fd: int, parts: list[bytes]) -> None:
    views = [memoryview(p) for p in parts if p]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _read(path: Path, msg_id: int) -> StoredMessage:
    data = path.read_bytes()
    if len(data) < _PREFIX.size:
        raise StoreDamage(f"cut short: {len(data)} of at least {_PREFIX.size} bytes", len(data))
    magic, version, header_len, payload_len, crc = _PREFIX.unpack_from(data)
    if magic != _MAGIC or version != _VERSION:
        raise StoreDamage("not a psi-broker message file (bad magic or version)", 0)
    if header_len > _HEADER_MAX:
        raise StoreDamage(f"header length {header_len} is implausible", 5)
    end = _PREFIX.size + header_len + payload_len
    if len(data) < end:
        raise StoreDamage(f"cut short: {len(data)} of {end} bytes", len(data))
    if len(data) > end:
        raise StoreDamage(f"{len(data) - end} bytes after the message", end)
    body = memoryview(data)[_PREFIX.size :]
    if zlib.crc32(body) != crc:
        raise StoreDamage("checksum mismatch", _PREFIX.size)
    try:
        header = json.loads(bytes(body[:header_len]).decode("utf-8"))
        fields = (header["session"], header["node"], header["topic"])
        metadata = header["metadata"]
        if not all(isinstance(f, str) for f in fields) or not isinstance(metadata, dict):
            raise ValueError("wrong field types")
    except (ValueError, KeyError, TypeError) as exc:
        raise StoreDamage(f"unreadable header ({exc})", _PREFIX.size) from None
    return StoredMessage(
        msg_id,
        *fields,
        {str(k): str(v) for k, v in metadata.items()},
        bytes(body[header_len:]),
    )
