"""Whether our broker can reach the peer's broker, told while the handshake waits.

Our broker answers a push OK once it has kept the message (its outbox sends it on behind), so
a HELLO pushed while the peer's broker is away is not refused: the broker retries it for
``forward.retry.timeout``. What the broker learns meanwhile it shows in ``/health`` under
``unreachable`` (see ``broker.reach``): per target party, each next hop that has not answered
since it last failed, why, since when, and whether messages are being retried now. The
handshake reads it every few seconds and says so at once, e.g. ``bob's broker at
10.0.0.2:9370 is not reachable from alice's broker (connection refused, for 4 s); still
waiting until 14:02:10``, and again in its final line should the wait time out.
"""

from __future__ import annotations

import time

from .broker_client import BrokerClient

CHECK_EVERY_S = 2.0


class PeerReach:
    """Reads our broker's view of the peer's next hop; ``text`` is the current problem."""

    def __init__(self, broker: str, me: str, peer: str, wait_until: float) -> None:
        self.client = BrokerClient(broker)
        self.me = me
        self.peer = peer
        self.wait_until = wait_until  # wall clock at which the handshake gives up
        self.text = ""  # "bob's broker at ... is not reachable ...", or "" when it is
        self._hops: dict[str, str] = {}
        self._since = 0.0
        self._next = time.monotonic() + 0.5  # once our first HELLO has had its try
        self._started = time.time()  # failures before this are of some earlier exchange

    def poll(self, now: float) -> str:
        """Every ``CHECK_EVERY_S`` (``now`` is monotonic): a line to show when what the
        broker says has changed, else ""."""
        if now < self._next:
            return ""
        self._next = now + CHECK_EVERY_S
        try:
            doc = self.client.health(timeout_s=2.0).get("unreachable")
        except (OSError, ValueError):
            return ""  # our broker's own trouble is the handshake's to report
        entry = doc.get(self.peer) if isinstance(doc, dict) else None
        hops = entry.get("next_hops") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and not entry.get("retrying"):
            try:
                if float(entry.get("last") or 0) < self._started:
                    hops = None  # an old failure, and nothing of ours is being retried
            except (TypeError, ValueError):
                hops = None
        if not isinstance(hops, dict) or not hops:
            if not self._hops:
                return ""
            self._hops, self.text = {}, ""
            return f"{self.peer}'s broker answers {self.me}'s broker again"
        hops = {str(k): str(v) for k, v in hops.items()}
        try:
            self._since = float(entry.get("since") or time.time())
        except (TypeError, ValueError):
            self._since = time.time()
        changed = hops != self._hops
        self._hops = hops
        self.text = self.describe()
        if not changed:
            return ""
        until = time.strftime("%H:%M:%S", time.localtime(self.wait_until))
        return f"{self.text}; still waiting for {self.peer} until {until} (timeout_s)"

    def describe(self) -> str:
        """The current problem in one clause (its age as of now), or ""."""
        if not self._hops:
            return ""
        seconds = time.time() - self._since
        age = f", for {seconds:.0f} s" if seconds >= 1 else ""
        if len(self._hops) == 1:
            addr, why = next(iter(self._hops.items()))
            return (
                f"{self.peer}'s broker at {addr} is not reachable from {self.me}'s broker "
                f"({why}{age})"
            )
        each = "; ".join(f"{addr}: {why}" for addr, why in self._hops.items())
        return (
            f"{self.peer}'s broker is not reachable from {self.me}'s broker on any of its "
            f"routes ({each}{age})"
        )
