"""One short WARNING line per refused request, rate-limited, whoever refused it.

The broker's own edge refuses malformed values (:mod:`broker.edge`); aiohttp and grpc refuse
what they cannot parse themselves (a bad Content-Length, a 10 KB header line, metadata that is
not UTF-8) and would log each with a full traceback at ERROR. :class:`LibraryLogFilter` turns
those records into the same short lines. A storm of bad requests therefore costs at most
``per_window`` lines every ``window_s`` seconds, plus one line counting the rest.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("broker.edge")

_REASON_MAX = 160


def short(text: str, limit: int = _REASON_MAX) -> str:
    """``text`` on one line, at most ``limit`` characters (a reason never floods the log)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class RefusalLog:
    """Rate-limited WARNING lines about refused requests: who sent what, and why."""

    def __init__(self, per_window: int = 20, window_s: float = 10.0, clock=time.monotonic):
        self.per_window = per_window
        self.window_s = window_s
        self._clock = clock
        # grpc's records come from its own threads as well as from the event loop.
        self._lock = threading.Lock()
        self._window_start = clock()
        self._logged = 0
        self._suppressed = 0
        self.total = 0

    def note(self, peer: str, where: str, reason: str) -> None:
        """Record one refusal of a request from ``peer`` to ``where`` (such as ``http pop``)."""
        with self._lock:
            self.total += 1
            self._roll(self._clock())
            if self._logged >= self.per_window:
                self._suppressed += 1
                return
            self._logged += 1
        log.warning("refused %s from %s: %s", where, peer or "unknown peer", short(reason))

    def flush(self, final: bool = False) -> None:
        """Report the refusals left unlogged in a window that has ended (called periodically),
        or in the current one too (``final``, at stop)."""
        with self._lock:
            self._roll(self._clock(), final)

    def _roll(self, now: float, final: bool = False) -> None:
        if now - self._window_start < self.window_s and not final:
            return
        if self._suppressed:
            log.warning(
                "refused %d more malformed requests in the last %.0f s (not logged one by one)",
                self._suppressed,
                now - self._window_start,
            )
        self._window_start = now
        self._logged = 0
        self._suppressed = 0


class LibraryLogFilter(logging.Filter):
    """Turns a library's warnings and errors (about requests it refused) into refusal lines.

    Attached to aiohttp's request-handler logger and to grpc's; records below WARNING pass
    unchanged (and are dropped by the INFO level anyway)."""

    def __init__(self, refusals: RefusalLog, where: str) -> None:
        super().__init__()
        self.refusals = refusals
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None:
            # aiohttp's parser errors carry a one-line .message; str() may add raw bytes.
            detail = getattr(exc, "message", None) or str(exc)
            reason = f"{type(exc).__name__}: {str(detail).splitlines()[0] if detail else ''}"
        else:
            # The bare template: the values may be the very bytes that were refused.
            reason = str(record.msg).replace("%s", "...")
        # aiohttp's "Error handling request from %s" passes the client's address.
        peer = str(record.args[0]) if isinstance(record.args, tuple) and record.args else ""
        if "request from" not in str(record.msg):
            peer = ""
        self.refusals.note(peer, self.where, reason)
        return False
