"""One short WARNING line per refused request, rate-limited, whoever refused it.

The broker's own edge refuses malformed values (:mod:`broker.edge`); aiohttp and grpc refuse
what they cannot parse themselves (a bad Content-Length, a 10 KB header line, metadata that is
not UTF-8) and would log each with a full traceback at ERROR. :class:`LibraryLogFilter` turns
those records into the same short lines. A storm of bad requests therefore costs at most
``per_window`` lines every ``window_s`` seconds, plus one line counting the rest.

A refusal answered with a PTP code (:meth:`RefusalLog.refused`) also leaves a REFUSED line
with that code in the flow log, throttled there the same way (:mod:`broker.flowlog`).
"""

from __future__ import annotations

import logging
import re
import time

from . import flowlog
from .edge import Refusal
from .flowlog import Held, Throttle

log = logging.getLogger("broker.edge")

_REASON_MAX = 160
_QUOTED = re.compile(r"[\s:]+b?['\"]")  # where a library's message starts quoting the input


def short(text: str, limit: int = _REASON_MAX) -> str:
    """``text`` on one line, at most ``limit`` characters (a reason never floods the log)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RefusalLog:
    """Rate-limited WARNING lines about refused requests: who sent what, and why."""

    def __init__(self, per_window: int = 20, window_s: float = 10.0, clock=time.monotonic):
        self._throttle = Throttle(per_window, window_s, clock)

    def note(self, peer: str, where: str, reason: str) -> None:
        """Record one refusal of a request from ``peer`` to ``where`` (such as ``http pop``)."""
        admitted, held = self._throttle.admit()
        _summarise(held)
        if admitted:
            log.warning("refused %s from %s: %s", where, peer or "unknown peer", short(reason))

    def refused(self, protocol: str, op: str, peer: str, refusal: Refusal) -> None:
        """A request answered with the refusal's PTP code: its WARNING line and its flow-log
        line (which names the session, topic and target when the request named them)."""
        self.note(peer, f"{protocol} {op}", refusal.reason)
        env = getattr(refusal, "envelope", None)
        flowlog.flow(
            protocol,
            flowlog.REFUSED,
            session=env.session if env else "",
            topic=env.topic if env else "",
            des=env.target_node if env else "",
            code=refusal.code,
            address=peer,
            msg=short(f"{op}: {refusal.reason}"),
        )

    def flush(self, final: bool = False) -> None:
        """Report the refusals left unlogged in a window that has ended (called periodically),
        or in the current one too (``final``, at stop); in the flow log as well."""
        _summarise(self._throttle.flush(final))
        flowlog.flush(final)


def _summarise(held: Held | None) -> None:
    if held is not None:
        log.warning(
            "refused %d more malformed requests in the last %.0f s (not logged one by one)",
            sum(held.counts.values()),
            held.seconds,
        )


class LibraryLogFilter(logging.Filter):
    """Turns a library's warnings and errors (about requests it refused) into refusal lines.

    Attached to aiohttp's request-handler logger and to grpc's. aiohttp logs a first request
    that is not HTTP at all (random bytes, a TLS hello) at DEBUG, not to be noisy; such a
    record, when the logger lets DEBUG through, is a refusal like the others, and the
    library's other DEBUG records are dropped. INFO records pass unchanged."""

    def __init__(self, refusals: RefusalLog, where: str) -> None:
        super().__init__()
        self.refusals = refusals
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:
        # aiohttp's "Error handling request from %s" passes the client's address.
        about_request = "request from" in str(record.msg)
        if record.levelno < logging.WARNING and not (about_request and record.exc_info):
            return record.levelno >= logging.INFO
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            # aiohttp's parser errors carry a one-line .message, which may quote the refused
            # bytes ('...' or b'...'): the reason stops before them.
            detail = str(getattr(exc, "message", None) or exc).splitlines()
            detail = _QUOTED.split(detail[0], maxsplit=1)[0] if detail else ""
            reason = f"{type(exc).__name__}: {detail}"
        else:
            # The bare template: the values may be the very bytes that were refused.
            reason = str(record.msg).replace("%s", "...")
        args = record.args
        peer = str(args[0]) if about_request and isinstance(args, tuple) and args else ""
        self.refusals.note(peer, self.where, reason)
        return False
