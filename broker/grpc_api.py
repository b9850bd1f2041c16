"""PTP over gRPC: OSX's ``PrivateTransferProtocol`` and ``PrivateTransferTransport``.

PTP headers travel as call metadata (``x-ptp-session-id``, ``x-ptp-topic``, ...); entries of
the message's own ``metadata`` map fill in any the call metadata lacks. Both are parsed by the
rules of :mod:`broker.edge`, and so are the messages themselves: bytes that do not decode are
not grpc's problem (it would answer ``UNKNOWN`` and log a traceback) but a refusal like any
other, answered with a PTP code in the method's own answer type.

``PopInbound.timeout`` is milliseconds, as OSX reads it and FATE's client sends it; a pop that
finds nothing in time is answered ``E0000000601`` with an empty payload, which FATE's client
recognises as a timeout.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from . import batch, codes, edge, wire
from .dispatch import Dispatcher
from .envelope import TOPIC, Envelope
from .proto import ptp_pb2
from .queues import Message
from .refusals import RefusalLog

log = logging.getLogger("broker.grpc")

_PROTOCOL = "org.ppc.ptp.PrivateTransferProtocol"
_TRANSPORT = "org.ppc.ptp.PrivateTransferTransport"
# A pop is answered this long before a client deadline that is shorter than its timeout, so
# that a message is not handed to a client that has already given up.
_ANSWER_MARGIN_S = 0.25


class _Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _lenient(message_type):
    """A request deserializer that never raises: bad bytes become an _Undecodable."""
    name = message_type.DESCRIPTOR.name

    def parse(raw: bytes):
        try:
            return message_type.FromString(raw)
        except Exception as exc:  # noqa: BLE001 - whatever the parser says, the bytes are at fault
            return _Undecodable(f"request is not a valid {name} message ({exc})")

    return parse


def _decoded(request):
    if isinstance(request, _Undecodable):
        raise edge.Refusal(request.reason)
    return request


def _envelope(context: grpc.aio.ServicerContext, message_metadata=None, topic: str = ""):
    """PTP headers of a call: its metadata, over the message's map, under the ``topic`` field."""
    sources = [message_metadata.items() if message_metadata else (), context.invocation_metadata()]
    if topic:
        sources.append(((TOPIC, topic),))
    return Envelope.parse(*sources)


def _outbound(
    code: str, text: str = "", message: Message | None = None
) -> ptp_pb2.TransportOutbound | bytes:
    """The answer of a Transport call, carrying ``message`` (a popped or peeked one) if any;
    with a message, already encoded (one copy of its payload instead of three)."""
    if message is None:
        return ptp_pb2.TransportOutbound(code=code, message=text)
    return wire.transport_outbound(code, text, message.payload, message.metadata)


def _serialize(answer) -> bytes:
    """A method's answer: a message, or bytes that _outbound encoded already."""
    return answer if isinstance(answer, bytes) else answer.SerializeToString()


class _Edge:
    """Turns a refusal into the method's answer (and one rate-limited line in broker.log and
    in flow.log); a bug, into a PTP 500 with its traceback in the log. grpc itself would
    answer ``UNKNOWN``."""

    def __init__(self, d: Dispatcher, protocol: str, refusals: RefusalLog) -> None:
        self.d = d
        self.protocol = protocol
        self.refusals = refusals

    def answer(self, exc: Exception, context, op: str, answer_type):
        if isinstance(exc, edge.Refusal):
            self.refusals.refused(self.protocol, op, context.peer(), exc)
            self.d.counters[f"errors|{exc.code}"] += 1
            return answer_type(code=exc.code, message=exc.reason)
        log.error("%s %s failed", self.protocol, op, exc_info=exc)
        return answer_type(code=codes.INTERNAL, message=codes.DESCRIPTIONS[codes.INTERNAL])

    def unary(self, answer_type, fn: Callable[..., Awaitable]):
        @functools.wraps(fn)
        async def handler(request, context):
            try:
                return await fn(_decoded(request), context)
            except Exception as exc:  # noqa: BLE001 - every failure gets a PTP answer
                return self.answer(exc, context, fn.__name__, answer_type)

        return handler


class _Protocol:
    def __init__(self, d: Dispatcher, protocol: str, edge_: _Edge) -> None:
        self.d = d
        self.protocol = protocol
        self.edge = edge_

    async def _one(self, request: ptp_pb2.Inbound, env: Envelope, peer: str):
        code, message = await self.d.deliver(
            env, request.payload, protocol=self.protocol, peer_addr=peer, from_network=True
        )
        return ptp_pb2.Outbound(code=code, message=message)

    async def invoke(self, request, context):
        return await self._one(request, _envelope(context, request.metadata), context.peer())

    async def invoke_batch(self, request: bytes, context) -> bytes:
        """Several messages from another broker in one call (see broker.batch)."""
        try:
            return await self.d.deliver_batch(
                request, protocol=self.protocol, peer_addr=context.peer()
            )
        except edge.Refusal as exc:
            self.edge.refusals.refused(self.protocol, "invokeBatch", context.peer(), exc)
            return batch.encode_answer([(exc.code, exc.reason)])

    async def transport(self, request_iterator, context) -> AsyncIterator[ptp_pb2.Outbound]:
        """One answer per message; a refused message does not end the stream."""
        async for request in request_iterator:
            try:
                request = _decoded(request)
                yield await self._one(request, _envelope(context, request.metadata), context.peer())
            except Exception as exc:  # noqa: BLE001 - every failure gets a PTP answer
                yield self.edge.answer(exc, context, "transport", ptp_pb2.Outbound)


class _Transport:
    def __init__(self, d: Dispatcher, protocol: str) -> None:
        self.d = d
        self.protocol = protocol

    async def push(self, request, context):
        code, message = await self.d.deliver(
            _envelope(context, request.metadata, request.topic),
            request.payload,
            protocol=self.protocol,
            peer_addr=context.peer(),
            from_network=False,
        )
        return _outbound(code, message)

    async def pop(self, request, context):
        key = self.d.queue_key(_envelope(context, topic=request.topic))
        default_s = self.d.cfg.consume_msg_waiting_timeout_ms / 1000
        timeout = edge.pop_timeout_ms(request.timeout, default_s)
        deadline = context.time_remaining()  # None when the client set no deadline
        if deadline is not None:
            timeout = max(0.0, min(timeout, deadline - _ANSWER_MARGIN_S))
        message = await self.d.pop(key, timeout, protocol=self.protocol)
        if message is None:
            return _outbound(codes.POP_TIMEOUT, codes.DESCRIPTIONS[codes.POP_TIMEOUT])
        return _outbound(codes.OK, "", message)

    async def peek(self, request, context):
        return _outbound(
            *self.d.peek(_envelope(context, topic=request.topic), protocol=self.protocol)
        )

    async def release(self, request, context):
        env = _envelope(context, topic=request.topic)
        return _outbound(*self.d.release(env, protocol=self.protocol))


def add_services(
    server: grpc.aio.Server,
    d: Dispatcher,
    protocol: str = "grpc",
    refusals: RefusalLog | None = None,
) -> None:
    """Serve both PTP services on ``server``, with request parsing that cannot fail."""
    edge_ = _Edge(d, protocol, refusals or RefusalLog())
    proto, trans = _Protocol(d, protocol, edge_), _Transport(d, protocol)
    out, tout = ptp_pb2.Outbound, ptp_pb2.TransportOutbound

    def unary(fn, request_type, answer_type):
        return grpc.unary_unary_rpc_method_handler(
            edge_.unary(answer_type, fn),
            request_deserializer=_lenient(request_type),
            response_serializer=_serialize,
        )

    protocol_methods = {
        "invoke": unary(proto.invoke, ptp_pb2.Inbound, out),
        "transport": grpc.stream_stream_rpc_method_handler(
            proto.transport,
            request_deserializer=_lenient(ptp_pb2.Inbound),
            response_serializer=out.SerializeToString,
        ),
    }
    transport_methods = {
        "push": unary(trans.push, ptp_pb2.PushInbound, tout),
        "pop": unary(trans.pop, ptp_pb2.PopInbound, tout),
        "peek": unary(trans.peek, ptp_pb2.PeekInbound, tout),
        "release": unary(trans.release, ptp_pb2.ReleaseInbound, tout),
    }
    relay_methods = {
        "invokeBatch": grpc.unary_unary_rpc_method_handler(
            proto.invoke_batch, request_deserializer=None, response_serializer=None
        )
    }
    handlers = [
        grpc.method_handlers_generic_handler(_PROTOCOL, protocol_methods),
        grpc.method_handlers_generic_handler(_TRANSPORT, transport_methods),
    ]
    if d.cfg.invoke_batch_enabled:  # otherwise UNIMPLEMENTED, as OSX answers it
        handlers.append(grpc.method_handlers_generic_handler(batch.GRPC_SERVICE, relay_methods))
    server.add_generic_rpc_handlers(tuple(handlers))


def server_options(d: Dispatcher) -> list[tuple[str, int]]:
    cfg = d.cfg
    return [
        ("grpc.max_receive_message_length", cfg.grpc_server_max_message_size),
        ("grpc.max_send_message_length", cfg.grpc_server_max_message_size),
        ("grpc.max_metadata_size", cfg.grpc_server_max_metadata_size),
        ("grpc.max_concurrent_streams", cfg.grpc_max_concurrent_calls),
        ("grpc.http2.lookahead_bytes", cfg.grpc_server_flow_control_window),
        ("grpc.keepalive_permit_without_calls", int(cfg.grpc_keepalive_without_calls)),
        ("grpc.keepalive_time_ms", cfg.grpc_keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", cfg.grpc_keepalive_timeout_ms),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
    ]
