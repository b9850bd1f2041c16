"""The flow log: one line per message handled, in OSX's ``flow.log`` layout.

    time|protocol|seq|ACTION|session:..|topic:..|des:..|code:..|cost:..|ip:port|size:..|msg

Actions: MSG_DOWNLOAD (stored for a local party), MSG_REDIRECT (sent on to another broker),
DEFAULT_CONSUME (popped), PEEK, RELEASE, QUEUE_EXPIRED, and REFUSED for requests turned away,
with the code they were answered.

REFUSED lines are the only ones a stranger can cause at will (junk costs nothing to send), so
they are throttled as broker.log's refusal lines are: at most ``REFUSED_PER_WINDOW`` lines
every ``REFUSED_WINDOW_S`` seconds; the rest are counted by code, and each code's count is one
REFUSED line once the window has ended. A flood of junk therefore cannot fill the disk.

The broker's own ``flow.log`` (:func:`write_to`, called by the CLI) is written here, a line
with one ``write()``: through the logging machinery a line cost about 40 microseconds, a
tenth of a broker's time per message. Lines are what ``FLOW_FORMAT`` and ``FLOW_DATEFMT``
make of them, which is how the flow logger writes when no file is set (tests, embedding).
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import NamedTuple

REFUSED = "REFUSED"
REFUSED_PER_WINDOW = 20
REFUSED_WINDOW_S = 10.0

_log = logging.getLogger("broker.flow")
_counter = itertools.count(1)
FLOW_FORMAT = "%(asctime)s,%(msecs)03d|%(message)s"
FLOW_DATEFMT = "%Y-%m-%d %H:%M:%S"


class FlowFile:
    """``flow.log`` opened for appending; each line formatted here and written at once
    (whole lines: appends of a few hundred bytes are not interleaved between threads)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        self._stamp = (-1, "")  # (second, its FLOW_DATEFMT text), replaced as one value

    def write(self, message: str) -> None:
        now = time.time()
        second = int(now)
        stamp = self._stamp
        if stamp[0] != second:
            stamp = self._stamp = (second, time.strftime(FLOW_DATEFMT, time.localtime(second)))
        line = f"{stamp[1]},{int((now - second) * 1000):03d}|{message}\n"
        os.write(self._fd, line.encode("utf-8", "backslashreplace"))

    def close(self) -> None:
        os.close(self._fd)


_file: FlowFile | None = None


def write_to(path: str | os.PathLike[str]) -> None:
    """Write the flow log to ``path`` from now on (the CLI's choice; the flow logger still
    says whether lines are written at all)."""
    global _file
    old, _file = _file, FlowFile(path)
    if old is not None:
        old.close()


class Held(NamedTuple):
    """What a throttle held back in a window that has ended: counts by kind, and its length."""

    counts: dict[str, int]
    seconds: float


class Throttle:
    """At most ``per_window`` events every ``window_s`` seconds; the rest are held back and
    counted by kind. Thread-safe: grpc reports from its own threads as well as the loop's."""

    def __init__(self, per_window: int = 20, window_s: float = 10.0, clock=time.monotonic) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._start = clock()
        self._passed = 0
        self._held: dict[str, int] = {}

    def admit(self, kind: str = "") -> tuple[bool, Held | None]:
        """Whether one more event may be reported now, and what the window that has just
        ended held back (None if it has not ended, or held nothing back)."""
        with self._lock:
            ended = self._roll(final=False)
            if self._passed < self.per_window:
                self._passed += 1
                return True, ended
            self._held[kind] = self._held.get(kind, 0) + 1
            return False, ended

    def flush(self, final: bool = False) -> Held | None:
        """What a window that has ended held back; with ``final``, the current one's too."""
        with self._lock:
            return self._roll(final)

    def _roll(self, final: bool) -> Held | None:
        now = self._clock()
        if now - self._start < self.window_s and not final:
            return None
        held = Held(self._held, now - self._start) if self._held else None
        self._start, self._passed, self._held = now, 0, {}
        return held


_refused = Throttle(REFUSED_PER_WINDOW, REFUSED_WINDOW_S)


def _clean(value: object) -> str:
    # A field must not break the line layout; names are validated anyway.
    return str(value).replace("|", "/").replace("\n", " ")


def flow(
    protocol: str,
    action: str,
    *,
    session: str = "",
    topic: str = "",
    des: str = "",
    code: str = "",
    started: float | None = None,
    address: str = "",
    size: int = 0,
    msg: str = "",
) -> None:
    """Write one flow-log line (cheap when the flow logger is disabled); REFUSED lines are
    throttled (see the module's docstring)."""
    if not _log.isEnabledFor(logging.INFO):
        return
    if action == REFUSED:
        admitted, held = _refused.admit(code)
        _summarise(held)
        if not admitted:
            return
    cost = int((time.monotonic() - started) * 1000) if started is not None else 0
    _write(protocol, action, session, topic, des, code, cost, address, size, msg)


def flush(final: bool = False) -> None:
    """Write the counts of REFUSED lines held back in a window that has ended (called every
    second), or in the current one too (``final``, when the broker stops)."""
    if _log.isEnabledFor(logging.INFO):
        _summarise(_refused.flush(final))


def _summarise(held: Held | None) -> None:
    if held is None:
        return
    for code, count in sorted(held.counts.items()):
        text = f"refused {count} more in the last {held.seconds:.0f} s (not logged one by one)"
        _write("-", REFUSED, "", "", "", code, 0, "", 0, text)


def _write(protocol, action, session, topic, des, code, cost, address, size, msg) -> None:
    seq = f"{int(time.time())}_{next(_counter)}"
    line = (
        f"{protocol}|{seq}|{action}|session:{_clean(session)}|topic:{_clean(topic)}"
        f"|des:{_clean(des)}|code:{code}|cost:{int(cost)}|{_clean(address)}|size:{int(size)}"
        f"|msg:{_clean(msg)}"
    )
    if _file is not None:
        _file.write(line)
    else:
        _log.info("%s", line)
