"""Watch a running PSI from outside SPU: our broker, and the peer's heartbeats.

SPU blocks in C++ until its receive timeout (20 minutes by default) when the other side is
gone, and its blackbox link polls a vanished broker in a tight loop. A background thread here
ends the job with one readable line instead when

* our own broker stays unreachable for ``broker_grace_s``;
* the peer sends an abort notice (its side of the job failed);
* the peer's heartbeats stop for ``peer_silence_s`` (its process died),
* neither side has made progress for ``stall_timeout_s`` (``stall``), or
* SPU's link has stopped calling our broker although the broker answers (``link``: a client
  that never reconnected after a broker restart; the job is then started again, ``relink``).

Heartbeats and notices travel on the job's control channel and carry both handshake nonces,
so messages of other runs are never taken for this peer's.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from . import notice
from .broker_client import BROKER_GRACE_S, check_broker
from .errors import LinkLost, PeerError, PreflightError, PsiRunError, Stalled
from .handshake import Agreement, control_channel
from .relink import LinkMeter
from .spec import JobSpec
from .stall import StallMeter

log = logging.getLogger("psi_runner.watchdog")

BEAT_EVERY_S = 3.0


class JobWatchdog:
    """Calls ``abort(error)`` (from its thread) when the job cannot finish."""

    def __init__(
        self,
        spec: JobSpec,
        me: str,
        agreed: Agreement,
        abort: Callable[[PsiRunError], None],
        broker_grace_s: float = BROKER_GRACE_S,
        peer_silence_s: float | None = None,
        stall: StallMeter | None = None,
        stall_timeout_s: float = 0.0,
        link: LinkMeter | None = None,
    ) -> None:
        if peer_silence_s is None:
            peer_silence_s = float(os.environ.get("PSI_RUN_PEER_SILENCE_S", "90"))
        self.spec = spec
        self.me = me
        self.peer = spec.peer_of(me)
        self.agreed = agreed
        self.abort = abort
        self.broker_grace_s = broker_grace_s
        self.peer_silence_s = peer_silence_s
        self.stall = stall
        self.stall_timeout_s = stall_timeout_s
        self.link = link
        self.channel = control_channel(spec, me)
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch, daemon=True, name="job-watchdog"),
            threading.Thread(target=self._beat, daemon=True, name="job-heartbeat"),
        ]

    def __enter__(self) -> JobWatchdog:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop watching and beating (idempotent)."""
        self._stop.set()

    def _beat(self) -> None:
        beat = {"type": "beat", "party": self.me, "nonce": self.agreed.nonce,
                "to": self.agreed.peer_nonce}  # fmt: skip
        while not self._stop.wait(BEAT_EVERY_S):
            if self.stall is not None:
                beat["idle_s"] = round(self.stall.own_idle_s(), 1)
            try:
                self.channel.push(beat)
            except (OSError, ValueError):
                pass  # the broker check reports a dead broker

    def _fire(self, error: str | PsiRunError) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self.abort(error if isinstance(error, PsiRunError) else PeerError(error))

    def _watch(self) -> None:
        broker_down: float | None = None
        peer_seen = time.monotonic()
        next_check = time.monotonic()
        job = self.spec.job_id
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_check:
                next_check = now + 2.0
                if self._stalled():
                    return self._fire(self._stall_error())
                try:
                    check_broker(self.spec.parties[self.me].broker, self.me, timeout_s=2.0)
                    broker_down = None
                except PreflightError as exc:
                    broker_down = broker_down or now
                    log.warning("broker check failed: %s", exc)
                if self.link is not None:
                    self.link.sample(broker_answers=broker_down is None)
                    if self.link.lost():
                        return self._fire(self._link_error())
                if broker_down is not None and now - broker_down >= self.broker_grace_s:
                    return self._fire(
                        f"job {job}: the broker of {self.me} stopped answering during the "
                        "PSI; the job was stopped and no result was written; restart the "
                        "broker and run the job again"
                    )
            if now - peer_seen > self.peer_silence_s:
                return self._fire(
                    f"job {job}: no sign of {self.peer} for {self.peer_silence_s:.0f} s during "
                    f"the PSI (its process or the link between the brokers is gone); no result "
                    "was written; check its log and run the job again"
                )
            try:
                msg = self.channel.pop(1.0)
            except (OSError, ValueError):
                time.sleep(1.0)
                continue
            if not msg or msg.get("nonce") != self.agreed.peer_nonce:
                continue  # another run's message
            if msg.get("to") != self.agreed.nonce:
                continue
            peer_seen = time.monotonic()
            if self.stall is not None and msg.get("type") == "beat":
                self.stall.peer_reported(msg.get("idle_s"))
            if msg.get("type") == "abort":
                return self._fire(notice.peer_failed(self.spec, msg))

    def _stalled(self) -> bool:
        if self.stall is None or self.stall_timeout_s <= 0:
            return False
        self.stall.sample()
        return self.stall.stalled_for() >= self.stall_timeout_s

    def _stall_error(self) -> Stalled:
        assert self.stall is not None
        return Stalled(
            f"job {self.spec.job_id}: the PSI made no progress on either side for "
            f"{self.stall_timeout_s:.0f} s (stalled in SPU stage {self.stall.stage()}); it was "
            "stopped and no result was written; run the job again (stall_timeout_s in the spec "
            "sets this limit)"
        )

    def _link_error(self) -> LinkLost:
        assert self.link is not None
        stage = "unknown"
        if self.stall is not None:
            self.stall.sample()  # not sampled when stall detection is off
            stage = self.stall.stage()
        return LinkLost(
            f"job {self.spec.job_id}: {self.me}'s SPU link did not reconnect to its broker "
            f"{self.spec.parties[self.me].broker} after the broker came back (no call from SPU "
            f"for {self.link.silent_for():.0f} s while the broker answered; SPU stage {stage}); "
            "this attempt was stopped at both sides"
        )
