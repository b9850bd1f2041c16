"""PTP headers of one message: their names, the rule each value meets, and the envelope.

The same headers travel as HTTP headers (PTP over HTTP/1.1), as gRPC call metadata and in the
``metadata`` map of a gRPC message, so one parser serves all three: :meth:`Envelope.parse`
takes the raw (name, value) pairs as each front end receives them and applies the rules of
:mod:`broker.edge`. Which headers an operation needs is checked afterwards, by
:meth:`Envelope.require`.

FATE's OSX client names the sender ``x-ptp-from-node-id`` (and ``x-ptp-from-inst-id``) where
the PTP standard, SPU and OSX itself say ``x-ptp-source-node-id``; the FATE names are read as
aliases, and the standard header wins when a request carries both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from functools import partial

from . import codes, edge

TOPIC = "x-ptp-topic"
SESSION = "x-ptp-session-id"
SOURCE_NODE = "x-ptp-source-node-id"
TARGET_NODE = "x-ptp-target-node-id"
SOURCE_INST = "x-ptp-source-inst-id"
TARGET_INST = "x-ptp-target-inst-id"
TRACE_ID = "x-ptp-trace-id"
TOKEN = "x-ptp-token"
HOPS = "x-ptp-hops"  # psi-run extension: brokers passed so far, to stop relay loops
FROM_NODE = "x-ptp-from-node-id"  # FATE's name for x-ptp-source-node-id
FROM_INST = "x-ptp-from-inst-id"  # FATE's name for x-ptp-source-inst-id

# header -> (Envelope field, the edge rule for its value)
_RULES: dict[str, tuple[str, Callable[[str, str | bytes], object]]] = {
    SESSION: ("session", edge.name),
    TOPIC: ("topic", edge.name),
    SOURCE_NODE: ("source_node", edge.name),
    TARGET_NODE: ("target_node", edge.name),
    SOURCE_INST: ("source_inst", edge.text),
    TARGET_INST: ("target_inst", edge.text),
    TRACE_ID: ("trace_id", edge.text),
    # A token that breaks the rules is refused as a wrong token is.
    TOKEN: ("token", partial(edge.text, code=codes.UNAUTHORIZED)),
    HOPS: ("hops", partial(edge.whole_number, max_digits=edge.HOPS_MAX_DIGITS)),
}
# alias -> the standard header it stands for when that one is absent
_ALIASES = {FROM_NODE: SOURCE_NODE, FROM_INST: SOURCE_INST}

Pairs = Iterable[tuple[str | bytes, str | bytes]]


class EnvelopeError(edge.Refusal):
    """A header the operation needs is missing; the message says which. ``envelope`` holds
    the headers the request did carry (for its flow-log line), when they are known."""

    def __init__(self, reason: str, envelope: Envelope | None = None) -> None:
        super().__init__(reason)
        self.envelope = envelope


def _header(key: str | bytes) -> str:
    # Header names are ASCII tokens; anything else simply matches no PTP header.
    return (key.decode("latin-1") if isinstance(key, bytes) else key).lower()


@dataclass(frozen=True)
class Envelope:
    """The PTP headers of one request, each one checked by its rule ("" when absent)."""

    session: str = ""
    topic: str = ""
    source_node: str = ""
    target_node: str = ""
    source_inst: str = ""
    target_inst: str = ""
    trace_id: str = ""
    token: str = field(default="", repr=False)
    hops: int = 0

    @classmethod
    def parse(cls, *sources: Pairs) -> Envelope:
        """The PTP headers among ``sources``, raw (name, value) pairs; a later source's
        value wins over an earlier one's, and a standard header over its alias. Other headers
        are ignored. Raise ``edge.Refusal`` naming the first header whose value breaks its rule
        or that a source repeats."""
        values: dict[str, object] = {}
        aliased: dict[str, object] = {}
        for source in sources:
            seen: set[str] = set()
            for key, raw in source:
                header = _header(key)
                standard = _ALIASES.get(header, header)
                rule = _RULES.get(standard)
                if rule is None:
                    continue
                if header in seen:
                    raise edge.Refusal(f"header {header} is given more than once")
                seen.add(header)
                name, parse = rule
                value = parse(f"header {header}", raw)
                if value:
                    (aliased if header != standard else values)[name] = value
        return cls(**{**aliased, **values})  # type: ignore[arg-type]

    def require(self, *, target: bool = True, default_node: str = "") -> Envelope:
        """This envelope, its source node defaulted to ``default_node``; raise
        EnvelopeError naming a header the operation needs and lacks.

        A push (``target``) needs a session, a topic and a target node: it is routed by its
        target alone, as OSX routes it, so its source may stay empty. A pop or peek (not
        ``target``) needs a session, a topic and the node whose queue it reads, which its
        source node header names."""
        env = self if self.source_node else replace(self, source_node=default_node)
        needed = [(SESSION, env.session), (TOPIC, env.topic)]
        if target:
            needed.append((TARGET_NODE, env.target_node))
        else:
            needed.append((f"{SOURCE_NODE} (or {FROM_NODE})", env.source_node))
        for header, value in needed:
            if not value:
                raise EnvelopeError(f"header {header} is missing", env)
        return env

    def headers(self) -> dict[str, str]:
        """The x-ptp-* headers for sending this message on."""
        out = {
            SESSION: self.session,
            TOPIC: self.topic,
            TARGET_NODE: self.target_node,
            HOPS: str(self.hops),
        }
        for name, value in (
            (SOURCE_NODE, self.source_node),
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
