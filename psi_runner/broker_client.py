"""The one HTTP client for a party's own broker (PTP queue API, health), used by the runner,
the demo, the tests and the benchmark.

The broker is this party's own, usually on loopback: its traffic never goes through an HTTP
proxy that the environment (``http_proxy``, ...) may name. Every PTP answer is HTTP 200 with a
protobuf ``TransportOutbound`` body; the status codes are ``broker.codes``.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping

from broker.proto.http_ptp_pb2 import TransportOutbound

from .errors import PreflightError, cut, shown

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# How long a job rides out its own broker not answering (a restart: its durable queues keep
# every accepted message) before it gives up and says so.
BROKER_GRACE_S = 20.0
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
        try:
            with urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read()
        except http.client.HTTPException as exc:  # not an HTTP/1.1 server (e.g. a gRPC port)
            raise ValueError(f"{self.address} does not speak HTTP/1.1 ({exc!r})") from exc
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
            "pop",
            ptp_headers(session, topic, node),
            b"",
            wait_s + 10,
            query=f"?timeout={wait_s:.3f}",  # a plain decimal: the broker refuses "1e+06"
        )

    def release(self, session: str, node: str, timeout_s: float = 5.0) -> None:
        """Drop the queues of ``session`` (best effort: a dead broker has nothing to drop)."""
        try:
            self.call("release", ptp_headers(session, source=node), b"", timeout_s)
        except (OSError, ValueError):
            pass

    def traffic(self, peer: str, timeout_s: float = 5.0) -> tuple[int, int]:
        """Bytes this broker has sent to and received from ``peer`` so far (its /metrics)."""
        with urlopen(self.url("/metrics"), timeout=timeout_s) as resp:
            text = resp.read().decode("utf-8", "replace")
        totals = {"out": 0, "in": 0}
        for direction in totals:
            match = re.search(
                rf'^psi_broker_bytes_{direction}_total{{peer="{re.escape(peer)}"}} (\d+)$',
                text,
                re.MULTILINE,
            )
            totals[direction] = int(match.group(1)) if match else 0
        return totals["out"], totals["in"]

    def session_traffic(self, session: str, timeout_s: float = 5.0) -> int:
        """Bytes the broker has carried on ``session`` so far, both ways (psi-run's own
        ``/v1/interconn/chan/traffic`` endpoint; raises ``OSError`` or ``ValueError``)."""
        return self._session_count(session, "bytes", timeout_s)

    def session_pops(self, session: str, timeout_s: float = 5.0) -> int:
        """Pops asked on ``session`` since the broker started (same endpoint; ``ValueError``
        from a broker too old to count them)."""
        return self._session_count(session, "pops", timeout_s)

    def _session_count(self, session: str, field: str, timeout_s: float) -> int:
        query = urllib.parse.urlencode({"session": session})
        with urlopen(self.url(f"{_CHAN}traffic?{query}"), timeout=timeout_s) as resp:
            doc = json.loads(resp.read().decode("utf-8"))
        try:
            return int(doc[field])
        except (KeyError, TypeError) as exc:
            raise ValueError("not a traffic document") from exc

    def health(self, timeout_s: float = 5.0) -> dict:
        """The broker's ``/health`` document (raises ``OSError`` or ``ValueError``)."""
        with urlopen(self.url("/health"), timeout=timeout_s) as resp:
            doc = json.loads(resp.read().decode("utf-8"))
        if not isinstance(doc, dict):
            raise ValueError("the health document is not a JSON object")
        return doc


_HEALTH_MAX = 1 << 20  # bytes of /health preflight reads; a broker's is under 1 KiB


class _NoAnswer(Exception):
    """Nothing answered at the address (refused, unresolvable, unreachable)."""


class _NotBroker(Exception):
    """Something answered, but not a psi-broker's HTTP PTP port; the message says what."""


def check_broker(broker: str, party: str, timeout_s: float = 5.0) -> dict:
    """Make sure our broker's HTTP PTP port answers and serves ``party``; its health document.

    Whatever else is at the address (a gRPC or TLS port, another service, nothing) is a
    ``PreflightError`` that names the address and what answered."""
    where = f"broker {cut(broker, 60)}"
    try:
        health = _health(broker, timeout_s)
        served = health.get("self_party")
        if not isinstance(served, list) or not all(isinstance(p, str) for p in served):
            raise _NotBroker("answers HTTP, but its /health is not a psi-broker's")
    except _NoAnswer as exc:
        raise PreflightError(
            f"{where} of party {party} does not answer ({exc}); start it with "
            f"psi-broker --conf-dir <its conf folder>, or fix parties.{party}.broker"
        ) from None
    except _NotBroker as exc:
        raise PreflightError(
            f"{where} of party {party} {exc}; parties.{party}.broker must be the "
            "broker's HTTP PTP port (http.port)"
        ) from None
    if party not in served:
        names = cut(", ".join(shown(p, 20)[1:-1] for p in served[:5]), 60) or "no party"
        raise PreflightError(
            f"{where} serves {names}, not {party}: point parties.{party}.broker at "
            f"{party}'s own broker, or set self_party in its route_table.json"
        )
    return health


def _health(address: str, timeout_s: float) -> dict:
    """GET /health, reading at most ``_HEALTH_MAX`` bytes; the JSON object it holds."""
    conn = http.client.HTTPConnection(address, timeout=timeout_s)  # never through a proxy
    try:
        try:
            conn.connect()
        except socket.gaierror:
            raise _NoAnswer("its host name does not resolve") from None
        except TimeoutError:
            raise _NoAnswer(f"no connection within {timeout_s:g} s") from None
        except OSError as exc:  # refused, unreachable
            raise _NoAnswer(exc.strerror or cut(str(exc), 60)) from None
        except ValueError:  # UnicodeError: a label of the name is too long or empty
            raise _NoAnswer("its host name is not a valid DNS name") from None
        try:
            conn.request("GET", "/health", headers={"Connection": "close"})
            resp = conn.getresponse()
            body = resp.read(_HEALTH_MAX + 1)
        except TimeoutError:
            raise _NotBroker(
                f"accepts connections but sends no HTTP answer within {timeout_s:g} s"
            ) from None
        except (OSError, http.client.HTTPException):
            raise _NotBroker(_what_answers(address, timeout_s)) from None
    finally:
        conn.close()
    if resp.status != 200:
        raise _NotBroker(f"answers HTTP {resp.status} at /health, not as a psi-broker")
    if len(body) > _HEALTH_MAX:
        raise _NotBroker("answers HTTP, but with more than 1 MiB at /health: not a psi-broker")
    try:
        doc = json.loads(body.decode("utf-8"))
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise _NotBroker("answers HTTP, but its /health is not a psi-broker's")
    return doc


def _what_answers(address: str, timeout_s: float) -> str:
    """What speaks at ``address`` when it does not answer HTTP/1.1: from its first bytes."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            first = sock.recv(64)
    except TimeoutError:
        return f"accepts connections but sends no HTTP answer within {timeout_s:g} s"
    except (OSError, ValueError):
        first = b""
    if len(first) >= 9 and first[3] in (0x04, 0x07) and first[:3] < b"\x00\x40\x00":
        return "answers HTTP/2 (gRPC?), not HTTP/1.1"  # a SETTINGS or GOAWAY frame
    if (first[:1] in (b"\x15", b"\x16") and first[1:2] == b"\x03") or (
        not first and _speaks_tls(host, int(port), timeout_s)
    ):
        return "answers TLS (an HTTPS or gRPC TLS port?), not plain HTTP"
    if not first:
        return "closes the connection without an HTTP answer"
    if first.startswith(b"HTTP/"):
        return "answers HTTP, but not as a psi-broker"
    return f"answers something that is not HTTP ({shown(first, 24)})"


def _speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    """Whether a TLS handshake gets a TLS answer (a certificate, or an alert) at all."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=host or None),
        ):
            return True
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
        return False  # closed without a word: not TLS either
    except ssl.SSLError:
        return True  # an alert, e.g. a client certificate is required
    except (OSError, ValueError):
        return False


def release_session(broker: str, session: str, party: str, timeout_s: float = 5.0) -> None:
    """Ask our broker to drop the queues of a finished session (best effort)."""
    BrokerClient(broker).release(session, party, timeout_s)
