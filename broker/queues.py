"""In-memory message queues, keyed by (session, receiving node, topic).

A queue is created by its first push or pop, consumed by long-polling pops, and removed by
``release`` or after ``queue.max.free.time`` without use. Memory is bounded in total and per
session; a push that does not fit is answered "queue full" (the sender retries), never dropped.
All methods run on the broker's event loop thread.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from . import codes


@dataclass(frozen=True)
class QueueKey:
    session: str
    node: str  # the party that consumes this queue
    topic: str


@dataclass
class Message:
    payload: bytes
    metadata: dict[str, str]


@dataclass
class _Queue:
    messages: deque[Message] = field(default_factory=deque)
    waiters: deque[asyncio.Future[Message | None]] = field(default_factory=deque)
    size: int = 0
    last_used: float = field(default_factory=time.monotonic)
    pushed: int = 0


class QueueStore:
    """All queues of one broker, with memory limits."""

    def __init__(self, max_total_bytes: int, max_session_bytes: int) -> None:
        self.max_total_bytes = max_total_bytes
        self.max_session_bytes = max_session_bytes
        self._queues: dict[QueueKey, _Queue] = {}
        self._session_bytes: dict[str, int] = {}
        self.total_bytes = 0

    def __len__(self) -> int:
        return len(self._queues)

    def depth(self) -> int:
        """Messages waiting in all queues."""
        return sum(len(q.messages) for q in self._queues.values())

    def _get(self, key: QueueKey) -> _Queue:
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue()
        q.last_used = time.monotonic()
        return q

    def push(self, key: QueueKey, message: Message) -> tuple[str, int]:
        """Store a message; return (code, messages now in the queue)."""
        q = self._get(key)
        size = len(message.payload)
        while q.waiters:
            waiter = q.waiters.popleft()
            if not waiter.done():
                waiter.set_result(message)
                q.pushed += 1
                return codes.OK, 0
        if size > min(self.max_total_bytes, self.max_session_bytes):
            return codes.TOO_LARGE, len(q.messages)  # could never fit: retrying is pointless
        session_bytes = self._session_bytes.get(key.session, 0)
        if size > 0 and (
            self.total_bytes + size > self.max_total_bytes
            or session_bytes + size > self.max_session_bytes
        ):
            return codes.QUEUE_FULL, len(q.messages)
        q.messages.append(message)
        q.size += size
        q.pushed += 1
        self.total_bytes += size
        self._session_bytes[key.session] = session_bytes + size
        return codes.OK, len(q.messages)

    def _take(self, key: QueueKey, q: _Queue) -> Message:
        message = q.messages.popleft()
        size = len(message.payload)
        q.size -= size
        self.total_bytes -= size
        left = self._session_bytes.get(key.session, 0) - size
        if left > 0:
            self._session_bytes[key.session] = left
        else:
            self._session_bytes.pop(key.session, None)
        return message

    async def pop(self, key: QueueKey, timeout_s: float) -> Message | None:
        """The oldest message, waiting up to ``timeout_s``; None when none came.

        A queue that is empty once the pop ends is dropped: pops naming sessions that never
        come (a careless or hostile client) must not leave a queue each for
        ``queue.max.free.time``."""
        q = self._queues.get(key)
        if q is not None and q.messages:
            q.last_used = time.monotonic()
            return self._take(key, q)
        if timeout_s <= 0:
            return None
        q = self._get(key)
        waiter: asyncio.Future[Message | None] = asyncio.get_running_loop().create_future()
        q.waiters.append(waiter)
        try:
            return await asyncio.wait_for(waiter, timeout_s)
        except asyncio.TimeoutError:
            return None
        except asyncio.CancelledError:
            # The consumer went away; a message already handed to it goes back in front.
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self.requeue(key, waiter.result())
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            try:
                q.waiters.remove(waiter)
            except ValueError:
                pass
            q.last_used = time.monotonic()
            if not q.messages and not q.waiters and self._queues.get(key) is q:
                del self._queues[key]

    def requeue(self, key: QueueKey, message: Message) -> None:
        """Put back a popped message whose consumer vanished before receiving it."""
        q = self._get(key)
        while q.waiters:
            waiter = q.waiters.popleft()
            if not waiter.done():
                waiter.set_result(message)
                return
        size = len(message.payload)
        q.messages.appendleft(message)
        q.size += size
        self.total_bytes += size
        self._session_bytes[key.session] = self._session_bytes.get(key.session, 0) + size

    def peek(self, key: QueueKey) -> Message | None:
        """The oldest message without consuming it."""
        q = self._queues.get(key)
        if q is None or not q.messages:
            return None
        q.last_used = time.monotonic()
        return q.messages[0]

    def release(self, session: str, node: str | None = None, topic: str | None = None) -> int:
        """Drop a session's queues (optionally only one node's or one topic's); return count."""
        doomed = [
            k
            for k in self._queues
            if k.session == session
            and (node is None or k.node == node)
            and (topic is None or k.topic == topic)
        ]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def _drop(self, key: QueueKey) -> None:
        q = self._queues.pop(key)
        for waiter in q.waiters:
            if not waiter.done():
                waiter.cancel()
        while q.messages:
            self._take(key, q)

    def close(self) -> None:
        """Wake every waiting pop with "no message" (used at shutdown)."""
        for q in self._queues.values():
            for waiter in q.waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def expire(self, max_free_s: float) -> list[QueueKey]:
        """Remove queues unused for ``max_free_s`` and nobody waiting on; return their keys."""
        now = time.monotonic()
        doomed = [
            k
            for k, q in self._queues.items()
            if now - q.last_used > max_free_s and not any(not w.done() for w in q.waiters)
        ]
        for key in doomed:
            self._drop(key)
        return doomed
