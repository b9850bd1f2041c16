"""Stall detection: a PSI whose processes are alive but which no longer moves.

A message lost between the brokers, or SPU waiting on itself (its ECDH stall), leaves both
runners alive, heartbeats flowing, until SPU's receive timeout (20 minutes by default). The
watchdog therefore measures progress on each side: new lines in SPU's log (its stage marks,
buckets, batches; repeated lines do not count, the log pump drops them; nor do warnings and
errors, which flood while a client retries a link that does not move) and bytes that the
party's broker carried on the PSI's link session. Heartbeats carry each side's idle time, so
both sides know whether *either* moved; when neither has for ``stall_timeout_s``, the job is
stopped on both sides with the SPU stage it stalled in.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from .broker_client import BrokerClient
from .progress import SpuProgress

# Lines that say something is wrong rather than that something moved: glog's W/E/F lines
# (brpc), spdlog's warning/error lines (SPU, yacl: "Not connected ... yet", send retries),
# psi-run's own WARNING and ERROR lines and the log pump's note on dropped repeats.
_NOT_PROGRESS = re.compile(
    rb"^\s*(?:[WEF]\d{4} "
    rb"|\[[^\]]*\] \[(?:warning|error|critical)\] "
    rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?:WARNING|ERROR|CRITICAL) "
    rb"|\[psi-run\] the line above repeated)"
)


def is_progress(line: bytes) -> bool:
    """Whether a new line of the job's log counts as this side moving."""
    return bool(line.strip()) and _NOT_PROGRESS.match(line) is None


class StallMeter:
    """This side's progress, sampled by the watchdog; and the peer's, from its heartbeats."""

    def __init__(self, log_path: Path, broker: str, session: str | list[str]) -> None:
        self.log_path = log_path
        self.client = BrokerClient(broker)
        # a sharded run's PSI moves on the shards' sessions: their traffic together
        self.sessions = [session] if isinstance(session, str) else list(session)
        self.spu = SpuProgress()
        now = time.monotonic()
        self.own_active = now
        self.peer_active = now
        self._offset = file_size(log_path)
        self._traffic = -1

    def sample(self) -> None:
        """Look for new progress of our own side (SPU's log, the link session's traffic)."""
        moved = self._read_log()
        traffic = self._session_traffic()
        if traffic != self._traffic:
            moved = moved or self._traffic >= 0
            self._traffic = traffic
        if moved:
            self.own_active = time.monotonic()

    def own_idle_s(self) -> float:
        return time.monotonic() - self.own_active

    def peer_reported(self, idle_s: object) -> None:
        """A heartbeat said the peer had been idle for ``idle_s`` when it was sent."""
        try:
            idle = max(float(idle_s), 0.0)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return
        if idle == idle:  # not NaN
            self.peer_active = max(self.peer_active, time.monotonic() - idle)

    def stalled_for(self) -> float:
        """Seconds for which neither side has moved."""
        return time.monotonic() - max(self.own_active, self.peer_active)

    def stage(self) -> str:
        return self.spu.stage or "start-up"

    def _read_log(self) -> bool:
        size = file_size(self.log_path)
        if size <= self._offset:
            return False
        moved = False
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read(min(size - self._offset, 4 << 20))
        except OSError:
            return False
        complete = data.rfind(b"\n") + 1
        self._offset += complete if complete else len(data)
        for line in data[:complete].splitlines():
            self.spu.feed(line)
            moved = moved or is_progress(line)
        return moved

    def _session_traffic(self) -> int:
        try:
            return sum(self.client.session_traffic(s) for s in self.sessions)
        except (OSError, ValueError):
            return self._traffic


def file_size(path: Path) -> int:
    """Size of a log file; 0 while it does not exist."""
    try:
        return path.stat().st_size
    except OSError:
        return 0
