"""The outbox: messages for another broker, answered OK once kept here, sent on behind.

A push (or a relayed ``invoke``) for a party this broker does not serve is admitted like a
message for a local queue (the same limits; in durable mode the same store, written before
the OK) and put in the *lane* of its queue at the peer, (session, target node, topic). Each
lane sends its messages in order, several in one call when several are waiting (see
:mod:`broker.batch`), while the sender is already pushing the next one: the sender waits for
this broker's disk, not for the round trip to the peer. A message leaves the outbox (and the
store) once the next hop has answered for it.

What the next hop answers decides:

* OK: delivered (to the next hop, which now keeps it durably in its turn).
* queue full: the lane waits and sends it again, for up to ``forward.retry.timeout``.
* no answer at all: :class:`broker.forward.Forwarder` retries for ``forward.retry.timeout``.
* anything else, or one of the two above for longer than ``forward.retry.timeout``: the
  message is given up, which the :class:`Outbox`'s ``settled`` callback makes known (the
  dispatcher logs an ERROR and refuses the next push on that queue with the peer's code).

After a restart the dispatcher puts the stored messages back in their lanes, in their
original order, before any port opens.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from . import batch, codes
from .envelope import Envelope
from .forward import Forwarder
from .queues import Message, QueueKey, QueueStore
from .routes import RouteTableFile

log = logging.getLogger("broker.outbox")

FULL_RETRY_S = 0.05  # first wait after a queue-full answer (doubling, at most 1 s)
# A lane holding this much makes the next push wait for room before it is answered: the
# sender is held back by the peer's pace, and the backlog (memory, disk) stays small.
LANE_MAX_BYTES = 16 << 20


@dataclass
class Outgoing:
    """One message in the outbox."""

    message: Message
    env: Envelope  # as it is sent on (hops counted, no token)
    protocol: str  # the front end it came in on, for its flow-log line
    started: float = field(default_factory=time.monotonic)
    full_since: float | None = None  # first queue-full answer of the next hop


# (lane key, message, code, text, the next hop's address or "") once a message is settled
Settled = Callable[[QueueKey, Outgoing, str, str, str], None]


@dataclass
class _Lane:
    items: deque[Outgoing] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    size: int = 0  # payload bytes in ``items``
    room: asyncio.Event = field(default_factory=asyncio.Event)  # set when under the limit


class Outbox:
    """Every lane of one broker; all methods run on the event loop."""

    def __init__(
        self,
        queues: QueueStore,
        forwarder: Forwarder,
        routes: RouteTableFile,
        retry_timeout_s: float,
        settled: Settled,
    ) -> None:
        self.queues = queues
        self.forwarder = forwarder
        self.routes = routes
        self.retry_timeout_s = retry_timeout_s
        self.settled = settled
        self._lanes: dict[QueueKey, _Lane] = {}
        self._closing = False

    def depth(self) -> int:
        """Messages waiting to be sent on."""
        return sum(len(lane.items) for lane in self._lanes.values())

    async def put(self, key: QueueKey, item: Outgoing) -> str:
        """Admit a message for the peer's queue ``key`` and start sending it; return OK, or
        the code for its sender when it is not kept (too large, full, disk full). While the
        lane holds ``LANE_MAX_BYTES`` this waits for room (queue full after
        ``forward.retry.timeout``)."""
        lane = self._lanes.get(key)
        while lane is not None and lane.size >= LANE_MAX_BYTES:
            lane.room.clear()
            try:
                await asyncio.wait_for(lane.room.wait(), self.retry_timeout_s)
            except asyncio.TimeoutError:
                return codes.QUEUE_FULL
            lane = self._lanes.get(key)
        code = self.queues.admit(key, item.message)
        if code == codes.OK:
            self._enqueue(key, item)
        return code

    def restore(self, key: QueueKey, item: Outgoing) -> None:
        """A message read back from the store at start: counted, and sent on."""
        self.queues.recount(key, item.message)
        self._enqueue(key, item)

    def _enqueue(self, key: QueueKey, item: Outgoing) -> None:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        lane.items.append(item)
        lane.size += len(item.message.payload)
        if lane.task is None and not self._closing:
            lane.task = asyncio.get_running_loop().create_task(self._run(key, lane))

    async def _run(self, key: QueueKey, lane: _Lane) -> None:
        try:
            while lane.items:
                if not await self._send_some(key, lane):
                    await asyncio.sleep(_full_wait(lane.items[0]))
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug: the messages stay (and are sent again after a restart)
            log.exception("outbox lane of %s stopped", key)
        finally:
            lane.task = None
            if not lane.items and self._lanes.get(key) is lane:
                del self._lanes[key]

    async def _send_some(self, key: QueueKey, lane: _Lane) -> bool:
        """Send the lane's first messages once; False when the first is to wait (full)."""
        items = _take(lane.items)
        hops = self.routes.table.lookup(key.node)
        if not hops:
            reason = f"no route to party {key.node!r} any more (the route table changed)"
            self._settle(key, lane, codes.ROUTE_NOT_FOUND, reason, "")
            return True
        answers, route = await self.forwarder.send_batch(
            hops, [(i.env, i.message.payload) for i in items]
        )
        target = route.target if route else hops[0].target
        if route is None:  # unreachable for forward.retry.timeout: every one is given up
            for _ in items:
                self._settle(key, lane, *answers[0], target)
            return True
        for code, text in answers:
            if code == codes.QUEUE_FULL:
                first = lane.items[0]
                now = time.monotonic()
                first.full_since = first.full_since or now
                if now - first.full_since < self.retry_timeout_s:
                    return False
                text = f"the queue at the peer stayed full for {self.retry_timeout_s:g} s"
            self._settle(key, lane, code, text, target)
        return True

    def _settle(self, key: QueueKey, lane: _Lane, code: str, text: str, target: str) -> None:
        item = lane.items.popleft()
        lane.size -= len(item.message.payload)
        if lane.size < LANE_MAX_BYTES:
            lane.room.set()
        self.queues.discharge(key, item.message)
        self.settled(key, item, code, text, target)

    async def close(self, grace_s: float) -> None:
        """Let the lanes send what they hold for up to ``grace_s``, then stop them (what is
        left stays in the durable store, if there is one, for the next start)."""
        self._closing = True
        tasks = [lane.task for lane in self._lanes.values() if lane.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        left = self.depth()
        if left:
            log.warning("stopping with %d message(s) not yet sent on", left)


def _take(items: deque[Outgoing]) -> list[Outgoing]:
    """The first messages of a lane, as many as one batch takes (at least one)."""
    out = [items[0]]
    size = len(items[0].message.payload)
    for item in itertools.islice(items, 1, batch.MAX_MESSAGES):
        size += len(item.message.payload)
        if size > batch.MAX_BYTES:
            break
        out.append(item)
    return out


def _full_wait(item: Outgoing) -> float:
    waited = time.monotonic() - (item.full_since or time.monotonic())
    return min(1.0, FULL_RETRY_S + waited / 2)
