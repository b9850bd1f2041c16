"""Message queues, keyed by (session, receiving node, topic).

A queue is created by its first push or pop, consumed by long-polling pops, and removed by
``release`` or after ``queue.max.free.time`` without use. Memory (and, in durable mode, disk)
is bounded in total and per session; a push that does not fit is answered "queue full" (the
sender retries), never dropped. All methods run on the broker's event loop thread.

Delivery is confirmed, not assumed: a popped message stays accounted for (and, in durable
mode, on disk) until the consumer's next pop on the same queue, the release of its session or
the queue's expiry. After a broker restart an unconfirmed message is offered again, so a
consumer may see a message twice; SPU's link drops a repeated sequence number and psi-run's
control messages are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field

from . import codes
from .store import MessageStore

log = logging.getLogger("broker.queues")


@dataclass(frozen=True)
class QueueKey:
    session: str
    node: str  # the party that consumes this queue
    topic: str


@dataclass
class Message:
    # Never in a repr: one of a megabyte costs milliseconds to format (and is not logged).
    payload: bytes = field(repr=False)
    metadata: dict[str, str]
    id: int = 0  # its file in the durable store (0 in memory mode)


@dataclass
class _Queue:
    messages: deque[Message] = field(default_factory=deque)
    waiters: deque[asyncio.Future[Message | None]] = field(default_factory=deque)
    size: int = 0
    last_used: float = field(default_factory=time.monotonic)
    pushed: int = 0
    # Handed to a consumer, not yet confirmed by its next pop: (id, size).
    unconfirmed: list[tuple[int, int]] = field(default_factory=list)


class QueueStore:
    """All queues of one broker, with memory limits and an optional durable store."""

    def __init__(
        self, max_total_bytes: int, max_session_bytes: int, store: MessageStore | None = None
    ) -> None:
        self.max_total_bytes = max_total_bytes
        self.max_session_bytes = max_session_bytes
        self.store = store
        self._queues: dict[QueueKey, _Queue] = {}
        self._session_bytes: dict[str, int] = {}
        self.total_bytes = 0
        self._next_id = 1
        self.store_errors = 0

    def __len__(self) -> int:
        return len(self._queues)

    def depth(self) -> int:
        """Messages waiting in all queues."""
        return sum(len(q.messages) for q in self._queues.values())

    def unconfirmed(self) -> int:
        """Messages handed to a consumer whose delivery is not confirmed yet."""
        return sum(len(q.unconfirmed) for q in self._queues.values())

    def _get(self, key: QueueKey) -> _Queue:
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = _Queue()
        q.last_used = time.monotonic()
        return q

    def _account(self, key: QueueKey, size: int) -> None:
        self.total_bytes += size
        left = self._session_bytes.get(key.session, 0) + size
        if left > 0:
            self._session_bytes[key.session] = left
        else:
            self._session_bytes.pop(key.session, None)

    def _persist(self, key: QueueKey, message: Message) -> bool:
        """Write ``message`` to the durable store (if any); False when the disk refused it."""
        if self.store is None:
            return True
        if not message.id:
            message.id = self._next_id
            self._next_id += 1
        try:
            self.store.put(
                message.id, key.session, key.node, key.topic, message.metadata, message.payload
            )
        except OSError as exc:
            self.store_errors += 1
            log.error(
                "store: cannot write a message of %d bytes to %s (%s); the sender is told "
                "the queue is full and retries",
                len(message.payload),
                self.store.folder,
                exc.strerror,
            )
            return False
        return True

    def admit(self, key: QueueKey, message: Message) -> str:
        """Count ``message`` against the limits and write it to the durable store (if any);
        return OK, or the code to answer its sender (nothing is kept then). Used for this
        broker's queues and for its outbox (messages for other brokers) alike."""
        size = len(message.payload)
        if size > min(self.max_total_bytes, self.max_session_bytes):
            return codes.TOO_LARGE  # could never fit: retrying is pointless
        session_bytes = self._session_bytes.get(key.session, 0)
        if size > 0 and (
            self.total_bytes + size > self.max_total_bytes
            or session_bytes + size > self.max_session_bytes
        ):
            return codes.QUEUE_FULL
        if not self._persist(key, message):
            return codes.QUEUE_FULL
        self._account(key, size)
        return codes.OK

    def discharge(self, key: QueueKey, message: Message) -> None:
        """Forget an admitted message that is not queued here (sent on, or given up)."""
        self._account(key, -len(message.payload))
        if self.store is not None and message.id:
            self.store.delete(message.id)

    def recount(self, key: QueueKey, message: Message) -> None:
        """Count a message read back from the durable store at start (no limits apply: it
        was accepted before the restart)."""
        self._account(key, len(message.payload))
        self._next_id = max(self._next_id, message.id + 1)

    def push(self, key: QueueKey, message: Message) -> tuple[str, int]:
        """Store a message; return (code, messages now in the queue)."""
        code = self.admit(key, message)
        if code != codes.OK:
            q = self._queues.get(key)
            return code, len(q.messages) if q and code == codes.QUEUE_FULL else 0
        q = self._get(key)
        q.pushed += 1
        if self._hand_to_waiter(key, q, message):
            return codes.OK, 0
        q.messages.append(message)
        q.size += len(message.payload)
        return codes.OK, len(q.messages)

    def _hand_to_waiter(self, key: QueueKey, q: _Queue, message: Message) -> bool:
        while q.waiters:
            waiter = q.waiters.popleft()
            if not waiter.done():
                waiter.set_result(message)
                q.unconfirmed.append((message.id, len(message.payload)))
                return True
        return False

    def _take(self, key: QueueKey, q: _Queue) -> Message:
        """The oldest queued message, now handed out and awaiting confirmation."""
        message = q.messages.popleft()
        q.size -= len(message.payload)
        q.unconfirmed.append((message.id, len(message.payload)))
        return message

    def _confirm(self, key: QueueKey, q: _Queue) -> None:
        """The consumer came back: everything handed to it before was delivered."""
        for msg_id, size in q.unconfirmed:
            self._account(key, -size)
            if self.store is not None:
                self.store.delete(msg_id)
        q.unconfirmed.clear()

    async def pop(self, key: QueueKey, timeout_s: float) -> Message | None:
        """The oldest message, waiting up to ``timeout_s``; None when none came.

        The pop confirms the delivery of what the previous pop of this queue handed out. A
        queue with nothing in it once the pop ends is dropped: pops naming sessions that never
        come (a careless or hostile client) must not leave a queue each for
        ``queue.max.free.time``."""
        q = self._queues.get(key)
        if q is not None:
            self._confirm(key, q)
            if q.messages:
                q.last_used = time.monotonic()
                return self._take(key, q)
        if timeout_s <= 0:
            self._drop_if_empty(key)
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
            # A waiter that got its message was taken off already. Test first: deque.remove's
            # ValueError formats the repr of the future and so of the message it carries.
            if waiter in q.waiters:
                q.waiters.remove(waiter)
            q.last_used = time.monotonic()
            self._drop_if_empty(key)

    def _drop_if_empty(self, key: QueueKey) -> None:
        q = self._queues.get(key)
        if q is not None and not q.messages and not q.waiters and not q.unconfirmed:
            del self._queues[key]

    def requeue(self, key: QueueKey, message: Message) -> None:
        """Put back a popped message whose consumer vanished before receiving it."""
        q = self._get(key)
        size = len(message.payload)
        entry = (message.id, size)
        if entry in q.unconfirmed:
            q.unconfirmed.remove(entry)
        else:  # already confirmed by a later pop (two consumers of one queue): store again
            self._account(key, size)
            self._persist(key, message)
        if self._hand_to_waiter(key, q, message):
            return
        q.messages.appendleft(message)
        q.size += size

    def restore(self, key: QueueKey, message: Message) -> None:
        """Queue a message read back from the durable store at start (no limits apply: it
        was accepted before the restart)."""
        q = self._get(key)
        q.messages.append(message)
        q.size += len(message.payload)
        self.recount(key, message)

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
                waiter.set_result(None)  # a pop waiting on a released queue: "nothing came"
        q.unconfirmed.extend((m.id, len(m.payload)) for m in q.messages)
        q.messages.clear()
        q.size = 0
        self._confirm(key, q)

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
