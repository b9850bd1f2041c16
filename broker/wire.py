"""The protobuf messages that carry a payload, encoded with one copy of it.

The generated classes copy a payload three times on the way out: into the message, while
growing the output buffer, and into the result; for messages of a megabyte that was a third
of a broker's time. These functions write the same bytes (fields in field-number order, as
protobuf does) around a single copy of the payload, or none: the small fields are still
encoded by the generated classes, only the payload field is written here.
"""

from __future__ import annotations

from collections.abc import Mapping

from .proto import http_ptp_pb2, ptp_pb2

_PAYLOAD_1 = b"\x0a"  # field 1, length-delimited: http_ptp.TransportOutbound.payload
_PAYLOAD_2 = b"\x12"  # field 2, length-delimited: ptp Inbound/TransportOutbound.payload


def varint(n: int) -> bytes:
    """``n`` (>= 0) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def inbound(metadata: Mapping[str, str], payload: bytes) -> bytes:
    """``ptp.Inbound(metadata=metadata, payload=payload).SerializeToString()``."""
    head = ptp_pb2.Inbound(metadata=metadata).SerializeToString()
    if not payload:  # proto3 leaves an empty bytes field out
        return head
    return b"".join((head, _PAYLOAD_2, varint(len(payload)), payload))


def transport_outbound(
    code: str, message: str, payload: bytes, metadata: Mapping[str, str]
) -> bytes:
    """``ptp.TransportOutbound(metadata=.., payload=.., code=.., message=..)``, encoded."""
    head = ptp_pb2.TransportOutbound(metadata=metadata).SerializeToString()
    tail = ptp_pb2.TransportOutbound(code=code, message=message).SerializeToString()
    if not payload:
        return head + tail
    return b"".join((head, _PAYLOAD_2, varint(len(payload)), payload, tail))


def http_answer(code: str, message: str, payload: bytes) -> tuple[bytes, bytes]:
    """``http_ptp.TransportOutbound(payload=.., code=.., message=..)`` encoded as the bytes
    before the payload and the bytes after it: the payload itself is sent as it is."""
    tail = http_ptp_pb2.TransportOutbound(code=code, message=message).SerializeToString()
    if not payload:
        return b"", tail
    return _PAYLOAD_1 + varint(len(payload)), tail
