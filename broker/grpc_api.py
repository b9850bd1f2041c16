"""PTP over gRPC: OSX's ``PrivateTransferProtocol`` and ``PrivateTransferTransport``.

PTP headers travel as call metadata (``x-ptp-session-id``, ``x-ptp-topic``, ...); entries of
the message's own ``metadata`` map fill in any the call metadata lacks.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

import grpc

from . import codes
from .dispatch import Dispatcher
from .envelope import SESSION, TOPIC, EnvelopeError
from .proto import ptp_pb2, ptp_pb2_grpc
from .queues import Message

log = logging.getLogger("broker.grpc")


def _headers(
    context: grpc.aio.ServicerContext, extra: Mapping[str, str] = {}, topic: str = ""
) -> dict[str, str]:
    """PTP headers of a call: its metadata, over ``extra`` (the message's map), under ``topic``."""
    merged = {k.lower(): v for k, v in extra.items()}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            merged[key.lower()] = value
    if topic:
        merged[TOPIC] = topic
    return merged


def _outbound(
    code: str, text: str = "", message: Message | None = None
) -> ptp_pb2.TransportOutbound:
    """The answer of a Transport call, carrying ``message`` (a popped or peeked one) if any."""
    if message is None:
        return ptp_pb2.TransportOutbound(code=code, message=text)
    return ptp_pb2.TransportOutbound(
        code=code, message=text, payload=message.payload, metadata=message.metadata
    )


class _Protocol(ptp_pb2_grpc.PrivateTransferProtocolServicer):
    def __init__(self, d: Dispatcher, protocol: str) -> None:
        self.d = d
        self.protocol = protocol

    async def _one(self, request: ptp_pb2.Inbound, headers: dict[str, str], peer: str):
        code, message = await self.d.deliver(
            headers, request.payload, protocol=self.protocol, peer_addr=peer, from_network=True
        )
        return ptp_pb2.Outbound(code=code, message=message)

    async def invoke(self, request, context):
        return await self._one(request, _headers(context, request.metadata), context.peer())

    async def transport(self, request_iterator, context) -> AsyncIterator[ptp_pb2.Outbound]:
        call_headers = _headers(context)
        async for request in request_iterator:
            headers = {**{k.lower(): v for k, v in request.metadata.items()}, **call_headers}
            yield await self._one(request, headers, context.peer())


class _Transport(ptp_pb2_grpc.PrivateTransferTransportServicer):
    def __init__(self, d: Dispatcher, protocol: str) -> None:
        self.d = d
        self.protocol = protocol

    async def push(self, request, context):
        code, message = await self.d.deliver(
            _headers(context, request.metadata, request.topic),
            request.payload,
            protocol=self.protocol,
            peer_addr=context.peer(),
            from_network=False,
        )
        return _outbound(code, message)

    async def pop(self, request, context):
        try:
            key = self.d.queue_key(_headers(context, topic=request.topic))
        except EnvelopeError as exc:
            return _outbound(codes.BAD_REQUEST, str(exc))
        timeout = (
            request.timeout
            if request.timeout > 0
            else (self.d.cfg.consume_msg_waiting_timeout_ms / 1000)
        )
        message = await self.d.pop(key, timeout, protocol=self.protocol)
        if message is None:
            return _outbound(codes.NOT_FOUND, "no message yet")
        return _outbound(codes.OK, "", message)

    async def peek(self, request, context):
        return _outbound(
            *self.d.peek(_headers(context, topic=request.topic), protocol=self.protocol)
        )

    async def release(self, request, context):
        session = _headers(context).get(SESSION, "")
        return _outbound(*self.d.release(session, request.topic or None, protocol=self.protocol))


def add_services(server: grpc.aio.Server, d: Dispatcher, protocol: str = "grpc") -> None:
    ptp_pb2_grpc.add_PrivateTransferProtocolServicer_to_server(_Protocol(d, protocol), server)
    ptp_pb2_grpc.add_PrivateTransferTransportServicer_to_server(_Transport(d, protocol), server)


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
