"""What this broker knows, right now, of the next hops it cannot reach.

The outbox answers a push OK once the message is kept here, so the pushing client (psi-run's
handshake, SPU's link) no longer learns from the push that the peer's broker is away: the
forwarder retries behind it for ``forward.retry.timeout``. This records, per target party
whose next hop did not answer, which next hop failed, why (in a few words:
``connection refused``, ``timeout``, ...) and since when, and ``/health`` shows it under
``unreachable`` so that a runner waiting for its peer can say why the peer does not answer.

A party leaves the record as soon as a next hop answers for it (whatever the answer). Each
entry says when the last attempt failed and whether messages for the party are being retried
now (once given up, the next push on their queue is told, see :mod:`broker.outbox`).
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
import time
import urllib.parse
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from .refusals import short
from .routes import Route

PARTIES_KEPT = 1000  # parties remembered (a `default` route lets any name through)
# Words of a gRPC status detail or of a client exception, and what they mean to a person.
_REASONS = (
    ("refused", "connection refused"),
    ("dns", "its host name does not resolve"),
    ("resolv", "its host name does not resolve"),
    ("name or service not known", "its host name does not resolve"),
    ("certificate", "TLS handshake failed"),
    ("ssl", "TLS handshake failed"),
    ("handshake", "TLS handshake failed"),
    ("no route to host", "no route to host"),
    ("unreachable", "network unreachable"),
    ("reset", "connection reset"),
    ("timed out", "timeout"),
    ("timeout", "timeout"),
    ("deadline", "timeout"),
    ("disconnected", "connection closed"),
    ("closed", "connection closed"),
    ("goaway", "connection closed"),
)


_ERRNOS = {
    errno.ECONNREFUSED: "connection refused",
    errno.ETIMEDOUT: "timeout",
    errno.ECONNRESET: "connection reset",
    errno.EHOSTUNREACH: "no route to host",
    errno.ENETUNREACH: "network unreachable",
}


def reason(detail: str | BaseException) -> str:
    """A few words for why a next hop did not answer: from the client's exception (its OS
    error, when it has one) or from a gRPC status detail."""
    if isinstance(detail, BaseException):
        return _reason_of(detail)
    low = detail.lower()
    for words, meaning in _REASONS:
        if words in low:
            return meaning
    return short(detail) or "no answer"


def _reason_of(exc: BaseException) -> str:
    seen: BaseException | None = exc
    for _ in range(4):  # the exception, then what it wraps (aiohttp's os_error, __cause__)
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError):
            return "TLS handshake failed"
        if isinstance(seen, socket.gaierror):
            return "its host name does not resolve"
        if isinstance(seen, (TimeoutError, asyncio.TimeoutError)):
            return "timeout"
        if isinstance(seen, OSError) and seen.errno in _ERRNOS:
            return _ERRNOS[seen.errno]
        seen = getattr(seen, "os_error", None) or seen.__cause__
    name = type(exc).__name__
    if "Disconnected" in name:  # aiohttp's ServerDisconnectedError
        return "connection closed"
    return short(str(exc)) or name


def address(route: Route) -> str:
    """``host:port`` of a route (of its URL for an HTTP route)."""
    if route.protocol == "http" and route.url:
        return urllib.parse.urlsplit(route.url).netloc or route.url
    return f"{route.ip}:{route.port}"


@dataclass
class _Trouble:
    since: float  # wall clock of the first failure since the party last answered
    errors: dict[str, str] = field(default_factory=dict)  # next hop address -> reason
    last: float = 0.0  # wall clock of the latest failure


class Reachability:
    """Next hops that do not answer, per target party (all methods on the event loop)."""

    def __init__(self) -> None:
        self._trouble: OrderedDict[str, _Trouble] = OrderedDict()
        self._retrying: Counter[str] = Counter()  # forwards now retrying, per party

    def retrying(self, party: str) -> None:
        """A forward for ``party`` starts retrying (pair with :meth:`settled`)."""
        self._retrying[party] += 1

    def settled(self, party: str) -> None:
        """A forward that was retrying is over (answered, given up or cancelled)."""
        self._retrying[party] -= 1
        if self._retrying[party] <= 0:
            del self._retrying[party]

    def failed(self, party: str, route: Route, detail: str | BaseException) -> None:
        now = time.time()
        trouble = self._trouble.get(party)
        if trouble is None:
            trouble = self._trouble[party] = _Trouble(since=now)
            if len(self._trouble) > PARTIES_KEPT:
                self._trouble.popitem(last=False)
        trouble.errors[address(route)] = reason(detail)
        trouble.last = now

    def answered(self, party: str) -> None:
        """A next hop answered for ``party`` (whatever it answered): it is reachable."""
        self._trouble.pop(party, None)

    def snapshot(self) -> dict[str, dict]:
        """``{party: {"next_hops": {address: reason}, "since", "last", "retrying"}}`` for
        parties whose next hop has not answered since it last failed (wall-clock seconds;
        ``retrying``: messages for it are being retried now)."""
        return {
            party: {
                "next_hops": dict(t.errors),
                "since": round(t.since, 3),
                "last": round(t.last, 3),
                "retrying": bool(self._retrying.get(party)),
            }
            for party, t in sorted(self._trouble.items())
        }
