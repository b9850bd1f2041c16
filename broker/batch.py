"""Several messages in one call between two psi-brokers (a psi-run extension to PTP).

A request is a sequence of frames, each a varint length and an encoded ``ptp.Inbound`` (the
message's PTP headers in its metadata map, and its payload). The answer is a sequence of
frames, each a varint length and an encoded ``http_ptp.TransportOutbound {code, message}``,
one per message taken, in order. The receiver stops at the first message it does not answer
OK: the messages after it are neither answered nor stored, and the sender sends them again,
in order. So a batch keeps each queue's order whatever happens to one of its messages.

Served as ``POST <http.context.path>/interconn/chan/invoke-batch`` and as the gRPC method
``/psirun.broker.Relay/invokeBatch`` (bytes in, bytes out). A peer that does not know them
(OSX, an older psi-broker) answers 404 or UNIMPLEMENTED, and the sender falls back to one
``invoke`` per message.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from .proto import http_ptp_pb2, ptp_pb2
from .wire import varint

HTTP_SUFFIX = "-batch"  # appended to a route's .../invoke URL
GRPC_METHOD = "/psirun.broker.Relay/invokeBatch"
GRPC_SERVICE = "psirun.broker.Relay"
MAX_BYTES = 1 << 20  # payload bytes of one batch (its first message may be larger)
MAX_MESSAGES = 512


def encode_request(items: Sequence[tuple[Mapping[str, str], bytes]]) -> bytes:
    """The frames of ``(headers, payload)`` items, joined once (one copy of each payload)."""
    parts: list[bytes] = []
    for headers, payload in items:
        head = ptp_pb2.Inbound(metadata=headers).SerializeToString()
        if payload:
            size = varint(len(payload))
            parts += (varint(len(head) + 1 + len(size) + len(payload)), head, b"\x12", size)
            parts.append(payload)
        else:  # proto3 leaves an empty bytes field out
            parts += (varint(len(head)), head)
    return b"".join(parts)


def _frames(body: bytes) -> Iterator[memoryview]:
    view, pos, end = memoryview(body), 0, len(body)
    while pos < end:
        length, shift = 0, 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("a frame length is cut short")
            byte = view[pos]
            pos += 1
            length |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                break
        if pos + length > end:
            raise ValueError(f"a frame of {length} bytes is cut short")
        yield view[pos : pos + length]
        pos += length


def decode_request(body: bytes) -> list[ptp_pb2.Inbound]:
    """The messages of a batch request; raise ValueError when it is not one."""
    try:
        return [ptp_pb2.Inbound.FromString(frame) for frame in _frames(body)]
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and kin: the bytes are bad
        raise ValueError(f"a frame is not an Inbound message ({exc})") from None


def encode_answer(results: Sequence[tuple[str, str]]) -> bytes:
    parts: list[bytes] = []
    for code, message in results:
        frame = http_ptp_pb2.TransportOutbound(code=code, message=message).SerializeToString()
        parts += (varint(len(frame)), frame)
    return b"".join(parts)


def decode_answer(body: bytes) -> list[tuple[str, str]]:
    """(code, message) of each message the peer took; raise ValueError on foreign bytes."""
    out = []
    try:
        for frame in _frames(body):
            answer = http_ptp_pb2.TransportOutbound.FromString(frame)
            if not answer.code:
                raise ValueError("an answer without a code")
            out.append((answer.code, answer.message))
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and kin
        raise ValueError(f"not a batch answer ({exc})") from None
    return out
