"""Stop a PSI whose own broker has gone away, instead of letting SPU poll it for 20 minutes.

SPU's blackbox link retries a vanished broker in a tight loop until its receive timeout; a
background thread here checks the broker and ends the job with a readable line instead.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from .broker_client import check_broker
from .errors import PreflightError

log = logging.getLogger("psi_runner.watchdog")


class BrokerWatchdog:
    """Calls ``abort(message)`` when the broker stays unreachable for ``grace_s``."""

    def __init__(self, broker: str, party: str, abort: Callable[[str], None],
                 grace_s: float = 20.0, every_s: float = 2.0) -> None:
        self.broker = broker
        self.party = party
        self.abort = abort
        self.grace_s = grace_s
        self.every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="broker-watchdog")

    def __enter__(self) -> BrokerWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        down_since: float | None = None
        while not self._stop.wait(self.every_s):
            try:
                check_broker(self.broker, self.party, timeout_s=self.every_s)
                down_since = None
            except PreflightError as exc:
                now = time.monotonic()
                down_since = down_since or now
                log.warning("broker check failed: %s", exc)
                if now - down_since >= self.grace_s and not self._stop.is_set():
                    self.abort(f"broker {self.broker} of party {self.party} stopped answering "
                               f"during the PSI ({self.grace_s:.0f} s); the job was stopped and "
                               "no result was written; restart the broker and run the job again")
                    return
