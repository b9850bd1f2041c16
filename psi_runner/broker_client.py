"""The one HTTP client for a party's own broker (PTP queue API, health), used by the runner,
the demo, the tests and the benchmark.

The broker is this party's own, usually on loopback: its traffic never goes through an HTTP
proxy that the environment (``http_proxy``, ...) may name. Every PTP answer is HTTP 200 with a
protobuf ``TransportOutbound`` body; the status codes are ``broker.codes``.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Mapping

from broker.proto.http_ptp_pb2 import TransportOutbound

from .errors import PreflightError

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_CHAN = "/v1/interconn/chan/"


def urlopen(request: urllib.request.Request | str, timeout: float):
    """urllib's urlopen without proxies."""
    return _OPENER.open(request, timeout=timeout)


def ptp_headers(session: str, topic: str = "", source: str = "", target: str = "") -> dict:
    """The ``x-ptp-*`` headers of a queue call; empty values are left out."""
    pairs = {
        "x-ptp-session-id": session,
        "x-ptp-topic": topic,
        "x-ptp-source-node-id": source,
        "x-ptp-target-node-id": target,
    }
    return {k: v for k, v in pairs.items() if v}


class BrokerClient:
    """Calls to one broker's HTTP PTP port (``host:port``)."""

    def __init__(self, address: str) -> None:
        self.address = address

    def url(self, path: str) -> str:
        return f"http://{self.address}{path}"

    def call(
        self,
        op: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        timeout_s: float = 10.0,
        query: str = "",
    ) -> TransportOutbound:
        """POST ``/v1/interconn/chan/<op><query>``; the decoded ``TransportOutbound``.

        Raises ``OSError`` (``urllib.error.URLError`` included) when the broker does not
        answer, ``ValueError`` when the answer is not a PTP message."""
        req = urllib.request.Request(
            self.url(_CHAN + op + query), data=body, method="POST", headers=dict(headers)
        )
        with urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
        out = TransportOutbound()
        try:
            out.ParseFromString(raw)
        except Exception as exc:
            raise ValueError(f"{self.address} did not answer with a PTP message") from exc
        return out

    def push(
        self,
        session: str,
        topic: str,
        source: str,
        target: str,
        payload: bytes,
        timeout_s: float = 120.0,
    ) -> TransportOutbound:
        """Queue ``payload`` for ``target`` (the broker routes it on)."""
        return self.call("push", ptp_headers(session, topic, source, target), payload, timeout_s)

    def pop(self, session: str, topic: str, node: str, wait_s: float) -> TransportOutbound:
        """Take the next message of ``topic`` for ``node``, waiting up to ``wait_s``."""
        return self.call(
            "pop", ptp_headers(session, topic, node), b"", wait_s + 10, query=f"?timeout={wait_s:g}"
        )

    def release(self, session: str, node: str, timeout_s: float = 5.0) -> None:
        """Drop the queues of ``session`` (best effort: a dead broker has nothing to drop)."""
        try:
            self.call("release", ptp_headers(session, source=node), b"", timeout_s)
        except (OSError, ValueError):
            pass

    def health(self, timeout_s: float = 5.0) -> dict:
        """The broker's ``/health`` document (raises ``OSError`` or ``ValueError``)."""
        with urlopen(self.url("/health"), timeout=timeout_s) as resp:
            doc = json.loads(resp.read().decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("the health document is not a JSON object")
        return doc


def check_broker(broker: str, party: str, timeout_s: float = 5.0) -> dict:
    """Make sure our broker answers and serves ``party``; return its health document."""
    try:
        health = BrokerClient(broker).health(timeout_s)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PreflightError(
            f"broker {broker} of party {party} does not answer ({reason}); start it with "
            f"psi-broker --conf-dir <its conf folder>, or fix parties.{party}.broker"
        ) from None
    served = health.get("self_party") or []
    if party not in served:
        raise PreflightError(
            f"broker {broker} serves {', '.join(served) or 'no party'}, not {party}: "
            f"point parties.{party}.broker at {party}'s own broker, or set self_party in its "
            "route_table.json"
        )
    return health


def release_session(broker: str, session: str, party: str, timeout_s: float = 5.0) -> None:
    """Ask our broker to drop the queues of a finished session (best effort)."""
    BrokerClient(broker).release(session, party, timeout_s)
