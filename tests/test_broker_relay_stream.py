"""The gRPC route's relay stream between two psi-brokers (broker.batch): messages go on one
long-lived call, a broker that stops ends it at once, and a peer without it (OSX, an older
psi-broker) gets one standard ``invoke`` per message instead."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from broker import codes
from broker.envelope import Envelope
from broker.forward import Forwarder
from broker.proto import ptp_pb2
from broker.server import GRACE_S
from harness.localnet import start_pair

TRANSPORT = "/org.ppc.ptp.PrivateTransferTransport/"


def _headers(session: str, source: str, target: str = "") -> tuple[tuple[str, str], ...]:
    pairs = [("x-ptp-session-id", session), ("x-ptp-source-node-id", source)]
    return tuple(pairs + ([("x-ptp-target-node-id", target)] if target else []))


@pytest.fixture
def pair(tmp_path):
    brokers = start_pair(tmp_path, properties={"consume.msg.waiting.timeout": "300"})
    yield brokers
    for b in brokers:
        b.stop()


def test_messages_cross_on_the_stream_and_a_stop_ends_it_at_once(pair):
    alice, bob = pair
    out = ptp_pb2.TransportOutbound.FromString
    with (
        grpc.insecure_channel(alice.addresses["grpc"]) as a,
        grpc.insecure_channel(bob.addresses["grpc"]) as b,
    ):
        push = a.unary_unary(
            TRANSPORT + "push",
            request_serializer=ptp_pb2.PushInbound.SerializeToString,
            response_deserializer=out,
        )
        pop = b.unary_unary(
            TRANSPORT + "pop",
            request_serializer=ptp_pb2.PopInbound.SerializeToString,
            response_deserializer=out,
        )
        sent = [bytes([n]) * (n * 1000 + 1) for n in range(1, 6)]
        for payload in sent:
            answer = push(
                ptp_pb2.PushInbound(topic="t", payload=payload),
                metadata=_headers("rs1", "alice", "bob"),
                timeout=10,
            )
            assert answer.code == codes.OK, answer.message
        got = []
        for _ in sent:
            answer = pop(
                ptp_pb2.PopInbound(topic="t", timeout=10_000),
                metadata=_headers("rs1", "bob"),
                timeout=20,
            )
            assert answer.code == codes.OK, answer.message
            got.append(answer.payload)
    assert got == sent
    # alice's relay stream to bob is open now; bob's stop must not wait out its grace on it.
    started = time.monotonic()
    bob.stop()
    assert time.monotonic() - started < GRACE_S - 1
    log = (bob.log_dir or bob.conf_dir / "logs") / "broker.log"
    assert "still busy" not in log.read_text(encoding="utf-8")


def test_a_peer_without_the_stream_gets_standard_invokes():
    """An OSX-like peer: only PrivateTransferProtocol.invoke."""
    received: list[tuple[str, bytes]] = []

    async def invoke(request: ptp_pb2.Inbound, context) -> ptp_pb2.Outbound:
        received.append((request.metadata["x-ptp-topic"], request.payload))
        return ptp_pb2.Outbound(code=codes.OK)

    async def run() -> tuple[list, list, bool, bool]:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            invoke,
            request_deserializer=ptp_pb2.Inbound.FromString,
            response_serializer=ptp_pb2.Outbound.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "org.ppc.ptp.PrivateTransferProtocol", {"invoke": handler}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        from broker.routes import Route

        forwarder = Forwarder(retry_timeout_s=5)
        route = Route(party="bob", protocol="grpc", ip="127.0.0.1", port=port)
        items = [
            (Envelope(session="s", topic=f"t{n}", source_node="alice", target_node="bob"), b"x")
            for n in range(2)
        ]
        try:
            first, _ = await forwarder.send_batch((route,), items)
            second, _ = await forwarder.send_batch((route,), items[1:])
            hop = forwarder._hop(route)
            return first, second, hop.streams, hop.batches
        finally:
            await forwarder.close()
            await server.stop(None)

    first, second, streams, batches = asyncio.run(run())
    # The batch is answered one message at a time; the rest is sent again by the outbox.
    assert first == [(codes.OK, "")] and second == [(codes.OK, "")]
    assert received == [("t0", b"x"), ("t1", b"x")]
    assert not streams and not batches
