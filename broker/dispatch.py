"""The broker's core: store a message for a local party, or keep it in the outbox, which
sends it on by the route table (:mod:`broker.outbox`).

Both front ends (HTTP and gRPC) call into one Dispatcher, so routing, limits, refusals and the
flow log behave the same whichever protocol a message arrived on.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import time
from collections import Counter, OrderedDict

from . import batch, codes, edge
from .config import BrokerConfig
from .envelope import SESSION, Envelope, EnvelopeError
from .flowlog import flow
from .forward import Forwarder
from .outbox import Outbox, Outgoing
from .queues import Message, QueueKey, QueueStore
from .routes import DEFAULT_PARTY, RouteTableFile
from .store import MessageStore

SESSIONS_COUNTED = 10_000  # sessions whose traffic /v1/interconn/chan/traffic can tell
FAILURES_KEPT = 10_000  # queues whose last undeliverable message the next push is told of
# yacl's link sends keep-alives of 11 to 70 bytes every 5 s on an idle session: that is not
# progress, so session traffic counts only larger messages.
KEEPALIVE_MAX_BYTES = 256
DUPLICATE_ENV = "PSI_BROKER_TEST_DUPLICATES"
log = logging.getLogger("broker.dispatch")


def _bump(counts: OrderedDict[str, int], session: str, by: int) -> None:
    """Add ``by`` to a session's count; the least recently counted session goes first."""
    counts[session] = counts.pop(session, 0) + by
    if len(counts) > SESSIONS_COUNTED:
        counts.popitem(last=False)


class Dispatcher:
    """Routing, queues and counters of one broker."""

    def __init__(self, cfg: BrokerConfig, routes: RouteTableFile) -> None:
        self.cfg = cfg
        self.routes = routes
        # Test-only: deliver every message twice, as a restart may deliver one (the tests show
        # that SPU's link and psi-run's control channel take that). Never set in production.
        self.duplicate_for_tests = os.environ.get(DUPLICATE_ENV) == "1"
        if self.duplicate_for_tests:
            log.warning("%s is set: every message is delivered twice (tests only)", DUPLICATE_ENV)
        self.store = (
            MessageStore(cfg.resolve(cfg.queue_store_dir), fsync=cfg.queue_store_fsync)
            if cfg.queue_durable
            else None
        )
        self.queues = QueueStore(
            cfg.queue_max_total_bytes, cfg.queue_max_session_bytes, store=self.store
        )
        self.forwarder = Forwarder(
            retry_timeout_s=cfg.forward_retry_timeout_ms / 1000,
            max_message=cfg.grpc_client_max_message_size,
            window=cfg.grpc_client_flow_control_window,
        )
        self.outbox = Outbox(
            self.queues,
            self.forwarder,
            routes,
            retry_timeout_s=cfg.forward_retry_timeout_ms / 1000,
            settled=self._forwarded,
        )
        # Peer queues whose message the outbox gave up: (code, reason) for the next push.
        self.failures: OrderedDict[QueueKey, tuple[str, str]] = OrderedDict()
        self.counters: Counter[str] = Counter()
        # Payload bytes carried per session (both ways), for a runner's stall detection;
        # bounded: the oldest session is forgotten first.
        self.session_bytes: OrderedDict[str, int] = OrderedDict()
        # Pops asked per session since start: a runner sees whether SPU's link still polls
        # its broker (it does every second while it lives). Bounded like session_bytes.
        self.session_pops: OrderedDict[str, int] = OrderedDict()

    def count_session(self, session: str, size: int) -> None:
        _bump(self.session_bytes, session, size)

    def open_store(self) -> None:
        """Lock the durable store and queue again every message it holds (unconfirmed ones
        included: they are offered again). Raise BrokerError if the store cannot be used."""
        if self.store is None:
            return
        self.store.open()
        count = outgoing = 0
        table = self.routes.table
        for stored in self.store.recover():
            key = QueueKey(stored.session, stored.node, stored.topic)
            message = Message(stored.payload, stored.metadata, stored.id)
            if table.is_self(stored.node):
                self.queues.restore(key, message)
                count += 1
                continue
            try:
                env = Envelope.parse(stored.metadata.items())
            except edge.Refusal as exc:  # written by this broker, so not expected
                log.error("store: message %d has unusable headers (%s); dropped", stored.id, exc)
                self.store.delete(stored.id)
                continue
            self.outbox.restore(key, Outgoing(message, env, "-"))
            outgoing += 1
        log.info(
            "durable queues in %s: %d message(s), %d bytes recovered; %d to send on",
            self.store.folder,
            count,
            self.store.bytes_on_disk,
            outgoing,
        )

    def close_store(self) -> None:
        if self.store is not None:
            self.store.close()

    @property
    def self_parties(self) -> frozenset[str]:
        return self.routes.table.self_parties

    def default_node(self) -> str:
        """The local party, when the broker serves exactly one (fills a missing header)."""
        parties = self.self_parties
        return next(iter(parties)) if len(parties) == 1 else ""

    def _count(self, code: str, peer: str, direction: str, size: int) -> None:
        if code == codes.OK:
            self.counters[f"messages_{direction}|{peer}"] += 1
            self.counters[f"bytes_{direction}|{peer}"] += size
        else:
            self.counters[f"errors|{code}"] += 1

    def queue_key(self, env: Envelope) -> QueueKey:
        """The queue a pop or peek names; raise EnvelopeError naming a missing header."""
        env = env.require(target=False, default_node=self.default_node())
        return QueueKey(env.session, env.source_node, env.topic)

    async def deliver(
        self,
        env: Envelope,
        payload: bytes,
        *,
        protocol: str,
        peer_addr: str,
        from_network: bool,
    ) -> tuple[str, str]:
        """Store or forward one message (push or invoke); return (code, message) for the sender.

        ``env`` comes from the edge (its values passed their rules); raise EnvelopeError when
        it lacks a header a message needs. A message is routed by its target alone; a local
        client that names no source (FATE's may not) speaks for this broker's party when it
        serves only one, but a message from the network is never given a source here."""
        env = env.require(default_node="" if from_network else self.default_node())
        outcome = _Outcome(self, env, protocol, len(payload))
        table = self.routes.table
        code, reason = self._refusal(env, outcome.size, from_network)
        if code is not None:
            outcome.record("REFUSED", code, reason, peer_addr)
            return code, reason

        if table.is_self(env.target_node):
            key = QueueKey(env.session, env.target_node, env.topic)
            code, depth = self.queues.push(key, Message(payload, env.headers()))
            if code == codes.OK and self.duplicate_for_tests:
                self.queues.push(key, Message(payload, env.headers()))
            outcome.record("MSG_DOWNLOAD", code, f"offset-in-queue:{depth}", peer_addr)
            return code, codes.DESCRIPTIONS.get(code, "")

        hops = table.lookup(env.target_node)
        if not hops:
            reason = (
                f"no route to party {env.target_node!r}: add it to {table.source} "
                f"(or a '{DEFAULT_PARTY}' route)"
            )
            # REFUSED, not MSG_REDIRECT: a flood of pushes to unknown parties stays bounded.
            outcome.record("REFUSED", codes.ROUTE_NOT_FOUND, reason, peer_addr)
            return codes.ROUTE_NOT_FOUND, reason
        key = QueueKey(env.session, env.target_node, env.topic)
        problem = self.forwarder.check(hops)
        failure = self.failures.pop(key, None)
        if problem or failure:
            code, reason = (codes.INTERNAL, problem) if problem else failure  # type: ignore[misc]
            if failure:
                reason = f"an earlier message of this queue was not delivered: {reason}"
            outcome.record("REFUSED", code, reason, peer_addr)
            return code, reason
        hop_env = env.next_hop()
        code = await self.outbox.put(
            key, Outgoing(Message(payload, hop_env.headers()), hop_env, protocol)
        )
        if code != codes.OK:
            outcome.record("MSG_REDIRECT", code, codes.DESCRIPTIONS.get(code, ""), peer_addr)
            return code, codes.DESCRIPTIONS.get(code, "")
        if outcome.size > KEEPALIVE_MAX_BYTES:  # the session moves now, not once sent on
            self.count_session(env.session, outcome.size)
        return codes.OK, ""

    def _forwarded(self, key: QueueKey, item: Outgoing, code: str, text: str, target: str) -> None:
        """The outbox is done with a message: its flow-log line, and a failure made known."""
        env = item.env
        outcome = _Outcome(self, env, item.protocol, len(item.message.payload), item.started)
        text = text or codes.DESCRIPTIONS.get(code, "")
        outcome.record("MSG_REDIRECT", code, text, target, outgoing=True, counted=True)
        if code == codes.OK:
            return
        log.error(
            "message for %s (session %s, topic %s, %d bytes) not delivered, given up: %s %s; "
            "the next push on this queue is answered with this code",
            env.target_node,
            env.session,
            env.topic,
            len(item.message.payload),
            code,
            text,
        )
        self.failures.pop(key, None)
        self.failures[key] = (code, text)
        if len(self.failures) > FAILURES_KEPT:
            self.failures.popitem(last=False)

    async def deliver_batch(self, body: bytes, *, protocol: str, peer_addr: str) -> bytes:
        """Deliver a batch from another broker (see broker.batch), in order, up to the first
        message not answered OK; return the encoded answers. Raise edge.Refusal when the
        body is not a batch."""
        try:
            inbounds = batch.decode_request(body)
        except ValueError as exc:
            raise edge.Refusal(f"malformed batch: {exc}") from None
        answers = []
        for inbound in inbounds:
            try:
                env = Envelope.parse(inbound.metadata.items())
                code, message = await self.deliver(
                    env, inbound.payload, protocol=protocol, peer_addr=peer_addr, from_network=True
                )
            except edge.Refusal as exc:
                self.counters[f"errors|{exc.code}"] += 1
                code, message = exc.code, exc.reason
            answers.append((code, message))
            if code != codes.OK:
                break
        return batch.encode_answer(answers)

    def _refusal(self, env: Envelope, size: int, from_network: bool) -> tuple[str | None, str]:
        if size > self.cfg.message_max_size:
            return codes.TOO_LARGE, (
                f"message of {size} bytes is over message.max.size ({self.cfg.message_max_size})"
            )
        if env.hops > self.cfg.relay_max_hops:
            return codes.HOP_LIMIT, f"message passed {env.hops} brokers; check for a route loop"
        table = self.routes.table
        if not from_network:
            return None, ""
        # OSX checks no source at all. Here a source the table does not know is refused unless
        # a 'default' party admits unknown ones; a message that names none is as unknown, and
        # auth.token applies to every message either way.
        if not (table.knows(env.source_node) or DEFAULT_PARTY in table.routes):
            if not env.source_node:
                return codes.UNAUTHORIZED, (
                    "message from another broker names no source node (x-ptp-source-node-id); "
                    f"only a route table with a '{DEFAULT_PARTY}' party accepts such messages"
                )
            return codes.UNAUTHORIZED, f"source node {env.source_node!r} is not in the route table"
        expected = self.cfg.auth_token
        if expected and not hmac.compare_digest(env.token.encode(), expected.encode()):
            return codes.UNAUTHORIZED, "x-ptp-token missing or wrong"
        return None, ""

    async def pop(self, key: QueueKey, timeout_s: float, *, protocol: str) -> Message | None:
        """Take the next message of ``key``, waiting up to ``timeout_s``; None if none came."""
        started = time.monotonic()
        _bump(self.session_pops, key.session, 1)
        message = await self.queues.pop(key, timeout_s)
        if message is not None:
            flow(
                protocol,
                "DEFAULT_CONSUME",
                session=key.session,
                topic=key.topic,
                des=key.node,
                code=codes.OK,
                started=started,
                size=len(message.payload),
            )
        return message

    def peek(self, env: Envelope, *, protocol: str) -> tuple[str, str, Message | None]:
        """Look at the next message of the queue ``env`` names without taking it.

        Returns (code, message, the queued message or None) for the caller; an empty queue is
        E0000000000 with no payload, as OSX answers it. Raises EnvelopeError when a header is
        missing."""
        key = self.queue_key(env)
        message = self.queues.peek(key)
        text = "queue is empty" if message is None else ""
        flow(
            protocol,
            "PEEK",
            session=key.session,
            topic=key.topic,
            des=key.node,
            code=codes.OK,
            size=len(message.payload) if message else 0,
            msg=text,
        )
        return codes.OK, text, message

    def release(self, env: Envelope, *, protocol: str) -> tuple[str, str]:
        """Drop ``env``'s session's queues (only its topic's, if it names one); return
        (code, message). Raises EnvelopeError without a session."""
        if not env.session:
            raise EnvelopeError(f"header {SESSION} is missing")
        session, topic = env.session, env.topic or None
        count = self.queues.release(session, topic=topic)
        for key in [k for k in self.failures if k.session == session]:
            if topic is None or key.topic == topic:
                del self.failures[key]
        if topic is None:
            self.session_bytes.pop(session, None)
            self.session_pops.pop(session, None)
        flow(
            protocol,
            "RELEASE",
            session=session,
            topic=topic or "*",
            code=codes.OK,
            msg=f"released:{count}",
        )
        return codes.OK, f"released {count} queue(s)"

    def reload_routes(self) -> None:
        """Pick up an edited route table; a broken edit keeps the table in use."""
        outcome, detail = self.routes.reload_if_changed()
        if outcome == "reloaded":
            table = self.routes.table
            log.info(
                "route table reloaded from %s: %d parties routed, self %s",
                table.source,
                len(table.routes),
                sorted(table.self_parties),
            )
            for warning in table.warnings:
                log.warning("route table: %s", warning)
            # Close the connections of routes the edit removed or changed.
            keep = {route for hops in table.routes.values() for route in hops}
            asyncio.get_running_loop().create_task(self.forwarder.prune(keep))
        elif outcome == "rejected":
            log.error("route table edit rejected, keeping the previous table: %s", detail)

    def expire_queues(self) -> None:
        for key in self.queues.expire(self.cfg.queue_max_free_time_ms / 1000):
            flow(
                "-",
                "QUEUE_EXPIRED",
                session=key.session,
                topic=key.topic,
                des=key.node,
                code=codes.OK,
            )


class _Outcome:
    """The flow-log line and the metrics of one pushed message, written once it is settled."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        env: Envelope,
        protocol: str,
        size: int,
        started: float | None = None,
    ) -> None:
        self.dispatcher = dispatcher
        self.env = env
        self.protocol = protocol
        self.size = size
        self.started = time.monotonic() if started is None else started

    def record(
        self,
        action: str,
        code: str,
        msg: str,
        address: str = "",
        outgoing: bool = False,
        counted: bool = False,
    ) -> None:
        """Its flow-log line and counters; ``counted``: its session's traffic counted already."""
        env = self.env
        flow(
            self.protocol,
            action,
            session=env.session,
            topic=env.topic,
            des=env.target_node,
            code=code,
            started=self.started,
            address=address,
            size=self.size,
            msg=msg,
        )
        # Incoming traffic is counted by its source, outgoing by its destination.
        party = env.target_node if outgoing else env.source_node
        self.dispatcher._count(code, party, "out" if outgoing else "in", self.size)
        if code == codes.OK and self.size > KEEPALIVE_MAX_BYTES and not counted:
            self.dispatcher.count_session(env.session, self.size)
