"""The hand-encoded payload messages are byte for byte what the generated classes write."""

from __future__ import annotations

import pytest

from broker import wire
from broker.proto import http_ptp_pb2, ptp_pb2

HEADERS = {
    "x-ptp-session-id": "s-1",
    "x-ptp-topic": "t",
    "x-ptp-source-node-id": "alice",
    "x-ptp-target-node-id": "bob",
    "x-ptp-hops": "1",
}
SIZES = [0, 1, 127, 128, 300, 16383, 16384, 1 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_inbound_is_what_protobuf_writes(size):
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    for metadata in (HEADERS, {}):
        want = ptp_pb2.Inbound(metadata=metadata, payload=payload).SerializeToString()
        assert wire.inbound(metadata, payload) == want


@pytest.mark.parametrize("size", SIZES)
def test_transport_outbound_is_what_protobuf_writes(size):
    payload = b"\xa5" * size
    for code, text, metadata in (("E0000000000", "", HEADERS), ("E0000000404", "none", {})):
        want = ptp_pb2.TransportOutbound(
            metadata=metadata, payload=payload, code=code, message=text
        ).SerializeToString()
        assert wire.transport_outbound(code, text, payload, metadata) == want


@pytest.mark.parametrize("size", SIZES)
def test_http_answer_around_the_payload_is_what_protobuf_writes(size):
    payload = b"\x00" * size
    prefix, tail = wire.http_answer("E0000000000", "", payload)
    want = http_ptp_pb2.TransportOutbound(payload=payload, code="E0000000000").SerializeToString()
    assert prefix + payload + tail == want


def test_varint_round_trips_lengths_up_to_the_largest_message():
    for n in (0, 1, 127, 128, 2**21, 2**28 + 5, 2**31 - 1):
        encoded = wire.varint(n)
        assert encoded[-1] < 0x80 and all(b >= 0x80 for b in encoded[:-1])
        assert sum((b & 0x7F) << (7 * i) for i, b in enumerate(encoded)) == n
