"""Is SPU's link still talking to its broker? Noticing a client that never reconnects.

SPU 0.9.3b0's blackbox link polls the party's own broker (a pop with a one-second wait) for as
long as it lives, so a healthy link shows up at the broker as a steady stream of pops on the
PSI's session. When that broker is killed, SPU's HTTP client (brpc) marks the broker's address
failed and only its health check (every 3 s) brings it back. Measured here with ECDH, when
SPU has messages to send at that moment, the health check runs again only once yacl has given
up retrying them (``send_retry_times`` x ``send_retry_interval_ms``: 60 s; 21 s with 20
retries), so the message it retried is dropped; until then every call fails inside SPU with
"Not connected to ... yet" without reaching the broker, and afterwards both sides wait for the
lost message until ``link.recv_timeout_ms`` (20 minutes by default) ends the job.

``LinkMeter`` watches for exactly that from outside: the broker answers our checks, and yet no
pop has arrived on the PSI's sessions for ``RELINK_AFTER_S``, once SPU's link is known to exist
(the broker counted a pop of it, or SPU's log shows it: a broker killed in the first seconds of
the PSI may have counted none before it died, and a new one starts at 0). The
watchdog then ends the attempt on both sides and the runner starts the job again
(``RELINKS_MAX`` times per job, apart from the spec's ``retries``), with a new SPU process and
link: see ``JobRun`` and the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .broker_client import BrokerClient
from .stall import file_size

# A healthy link pops every second or so; brpc revives a restarted broker's address within
# about 3 s of its return. Ten seconds of silence from SPU while the broker answers is neither.
RELINK_AFTER_S = 10.0
RELINKS_MAX = 2  # automatic restarts of a job whose SPU link did not reconnect
# yacl's blackbox link names its source file in the line it logs when it is created (and in
# every failed call): SPU's link exists even if the broker never counted a pop of it.
_LINK_MARK = b"brpc_blackbox_link"
_READ_MAX = 4 << 20  # bytes of the log read per sample


class LinkMeter:
    """Pops on the PSI's sessions at our broker, sampled by the watchdog (every 2 s)."""

    def __init__(
        self,
        broker: str,
        sessions: list[str],
        log_path: Path | None = None,
        after_s: float = RELINK_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = BrokerClient(broker)
        self.sessions = list(sessions)
        self.after_s = after_s
        self.clock = clock
        self.log_path = log_path
        self._offset = file_size(log_path) if log_path is not None else 0
        self._pops: int | None = None  # at the last sample that could read them
        self._seen = False  # SPU's link has polled at least once: it exists
        self._moved = clock()  # last time the count changed (a restarted broker counts anew)
        self._broker_up = clock()  # since when the broker has answered every check

    def sample(self, broker_answers: bool) -> None:
        """Record one watchdog check: whether our broker answered it, and the pops so far."""
        now = self.clock()
        self._seen = self._seen or self._link_logged()
        if not broker_answers:
            self._broker_up = now
            return
        pops = self._read()
        if pops is None:  # a broker that does not count pops: no opinion
            self._broker_up = now
            return
        if pops != self._pops:
            if self._pops is not None or pops > 0:
                self._moved = now
            self._seen = self._seen or pops > 0
            self._pops = pops

    def silent_for(self) -> float:
        """Seconds for which SPU's link has not called its answering broker (0: no verdict)."""
        if not self._seen:
            return 0.0
        return max(self.clock() - max(self._moved, self._broker_up), 0.0)

    def lost(self) -> bool:
        return self.silent_for() >= self.after_s

    def _read(self) -> int | None:
        try:
            return sum(self.client.session_pops(s, timeout_s=2.0) for s in self.sessions)
        except (OSError, ValueError):
            return None

    def _link_logged(self) -> bool:
        """Whether SPU's log (from where it stood at the start) shows its blackbox link."""
        if self.log_path is None:
            return False
        size = file_size(self.log_path)
        if size <= self._offset:
            return False
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read(min(size - self._offset, _READ_MAX))
        except OSError:
            return False
        keep = len(_LINK_MARK) - 1  # a mark cut at the end of this read is found next time
        self._offset += max(len(data) - keep, 0)
        return _LINK_MARK in data
