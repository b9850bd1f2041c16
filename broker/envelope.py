"""PTP headers of one message, and their validation.

The same headers travel as HTTP headers (PTP over HTTP/1.1) and as gRPC call metadata, so one
parser serves both. Names received from the network are checked against a strict pattern:
they key in-memory queues only and can never choose a file path.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

TOPIC = "x-ptp-topic"
SESSION = "x-ptp-session-id"
SOURCE_NODE = "x-ptp-source-node-id"
TARGET_NODE = "x-ptp-target-node-id"
SOURCE_INST = "x-ptp-source-inst-id"
TARGET_INST = "x-ptp-target-inst-id"
TRACE_ID = "x-ptp-trace-id"
TOKEN = "x-ptp-token"
HOPS = "x-ptp-hops"  # psi-run extension: brokers passed so far, to stop relay loops

_NAME = re.compile(r"^[A-Za-z0-9._:@#=+\-]{1,256}$")


class EnvelopeError(ValueError):
    """A header is missing or malformed; the message says which."""


@dataclass(frozen=True)
class Envelope:
    session: str
    topic: str
    source_node: str
    target_node: str
    source_inst: str = ""
    target_inst: str = ""
    trace_id: str = ""
    token: str = field(default="", repr=False)
    hops: int = 0

    @classmethod
    def from_headers(
        cls, headers: Mapping[str, str], *, need_target: bool = True, default_node: str = ""
    ) -> Envelope:
        """Build from x-ptp-* headers; raise EnvelopeError naming a bad header."""

        def get(name: str) -> str:
            return (headers.get(name) or "").strip()

        session, topic = get(SESSION), get(TOPIC)
        source, target = get(SOURCE_NODE) or default_node, get(TARGET_NODE)
        for name, value in ((SESSION, session), (TOPIC, topic), (SOURCE_NODE, source)):
            check_name(name, value)
        if need_target:
            check_name(TARGET_NODE, target)
        hops_text = get(HOPS) or "0"
        if not hops_text.isdigit():
            raise EnvelopeError(f"header {HOPS} must be a whole number")
        return cls(
            session=session,
            topic=topic,
            source_node=source,
            target_node=target,
            source_inst=get(SOURCE_INST),
            target_inst=get(TARGET_INST),
            trace_id=get(TRACE_ID),
            token=get(TOKEN),
            hops=int(hops_text),
        )

    def headers(self) -> dict[str, str]:
        """The x-ptp-* headers for sending this message on."""
        out = {
            SESSION: self.session,
            TOPIC: self.topic,
            SOURCE_NODE: self.source_node,
            TARGET_NODE: self.target_node,
            HOPS: str(self.hops),
        }
        for name, value in (
            (SOURCE_INST, self.source_inst),
            (TARGET_INST, self.target_inst),
            (TRACE_ID, self.trace_id),
            (TOKEN, self.token),
        ):
            if value:
                out[name] = value
        return out

    def next_hop(self) -> Envelope:
        return replace(self, hops=self.hops + 1)


def check_name(header: str, value: str) -> None:
    """Raise EnvelopeError unless ``value`` is a safe session/topic/node name."""
    if not value:
        raise EnvelopeError(f"header {header} is missing")
    if not _NAME.match(value):
        raise EnvelopeError(
            f"header {header} must be 1-256 characters of letters, digits and ._:@#=+-"
        )
