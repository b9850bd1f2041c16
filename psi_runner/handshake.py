"""Prove, before any SPU link exists, that the peer runs the same job — and wait for it.

Each run picks a fresh random nonce and exchanges HELLO messages with the peer through the two
brokers, on a control session of its own (``<job_id>.hs``)::

    HELLO {nonce, seen, mode, shared fields, digest, versions}

``seen`` is the peer nonce this run has received. A HELLO whose ``seen`` is our own nonce can
only come from a live peer of *this* attempt: stale messages of a killed earlier run, or of
another run of the same job, carry other nonces, so they only teach us a nonce and are never
compared. Only such live HELLOs are compared: any difference ends both runs within seconds,
naming every differing field with both values. When they agree, the SPU link's session id is
derived from both nonces, so it is fresh for every attempt and the same on both sides.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

from broker import codes

from . import __version__, notice
from .broker_client import BROKER_GRACE_S, BrokerClient
from .digest import shared_fields, spec_digest
from .errors import PeerError, PreflightError
from .peer_reach import PeerReach
from .spec import JobSpec

log = logging.getLogger("psi_runner.handshake")

PROGRESS_EVERY_S = 10.0
RESEND_EVERY_S = 2.0
NOTICE_GRACE_S = 2.0  # how long a newer HELLO may take to overrule an unaddressed notice


def versions() -> dict[str, str]:
    out = {"psi-run": __version__}
    for dist in ("spu", "secretflow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@dataclass(frozen=True)
class Agreement:
    """What the handshake established."""

    session: str  # SPU link session id, fresh per attempt and identical at both parties
    peer_versions: dict[str, str]
    waited_s: float
    nonce: str = ""
    peer_nonce: str = ""
    peer_checkpoint: dict | None = None  # what the peer said of its checkpoint (resume)
    # How the peer hands its keys to SPU: "quoted" (its file as it is, every key in quotes),
    # "bare" (its file as it is) or "canonical"; "" from a peer that does not say.
    peer_keys_form: str = ""
    peer_cache: dict | None = None  # what the peer said of its unbalanced cache (unbalanced)
    peer_key_codes: list | None = None  # the key codes the peer can write (None: not said)
    peer_digest_forms: list | None = None  # the key forms the peer can digest (None: not said)


class _Channel:
    """Push/pop of JSON control messages through our own broker."""

    def __init__(self, broker: str, session: str, me: str, peer: str) -> None:
        self.client = BrokerClient(broker)
        self.session = session
        self.me = me
        self.peer = peer

    def push(self, message: dict) -> tuple[str, str]:
        body = json.dumps(message, sort_keys=True).encode("utf-8")
        topic = notice.control_topic(self.me, self.peer)
        out = self.client.push(self.session, topic, self.me, self.peer, body)
        return out.code, out.message

    def pop(self, timeout_s: float) -> dict | None:
        topic = notice.control_topic(self.peer, self.me)
        out = self.client.pop(self.session, topic, self.me, timeout_s)
        if out.code != codes.OK or not out.payload:
            return None
        try:
            msg = json.loads(out.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            log.warning("ignoring an unreadable control message")
            return None
        return msg if isinstance(msg, dict) else None

    def release(self) -> None:
        self.client.release(self.session, self.me)


class _Sender(threading.Thread):
    """Pushes HELLOs in the background: a push to an absent peer can block for a while."""

    def __init__(self, channel: _Channel) -> None:
        super().__init__(daemon=True, name="handshake-sender")
        self.channel = channel
        self.last_error = ""
        self._cond = threading.Condition()
        self._pending: dict | None = None
        self._busy = False
        self._stop = False

    def send(self, msg: dict) -> None:
        """Queue a HELLO; only the newest queued one is sent."""
        with self._cond:
            self._pending = msg
            self._cond.notify_all()

    def flush(self, timeout_s: float) -> None:
        """Wait until everything queued has been pushed (or the time is up)."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending is None and not self._busy, timeout_s)

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()

    def run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stop)
                if self._pending is None:
                    return
                msg, self._pending, self._busy = self._pending, None, True
            try:
                code, text = self.channel.push(msg)
            except (OSError, ValueError) as exc:
                code, text = "local", f"own broker did not answer ({getattr(exc, 'reason', exc)})"
            with self._cond:
                self.last_error = "" if code == codes.OK else (text or code)
                self._busy = False
                self._cond.notify_all()


def _differences(spec: JobSpec, me: str, mine: dict, peer: str, theirs: dict) -> list[str]:
    """Every difference, worded identically at both parties (spec order of parties)."""
    order = spec.party_names
    if order.index(me) > order.index(peer):
        return _differences_ordered(peer, theirs, me, mine)
    return _differences_ordered(me, mine, peer, theirs)


def _differences_ordered(p1: str, m1: dict, p2: str, m2: dict) -> list[str]:
    def both(x: object, y: object) -> str:
        return f"({p1}: {_show(x)}, {p2}: {_show(y)})"

    diffs = []
    if m1.get("mode") != m2.get("mode"):
        diffs.append(
            f"mode differs {both(m1.get('mode'), m2.get('mode'))}; "
            "run --check on both sides, or on neither"
        )
    a, b = m1.get("fields") or {}, m2.get("fields") or {}
    for key in list(a) + [k for k in b if k not in a]:  # the spec's own order: protocol first
        if key == "ecdh_curve" and a.get("protocol") != b.get("protocol"):
            continue  # follows from the protocol difference
        x, y = a.get(key), b.get(key)
        if x == y:
            continue
        if isinstance(x, dict) and isinstance(y, dict):
            for sub in list(x) + [k for k in y if k not in x]:
                if x.get(sub) != y.get(sub):
                    diffs.append(f"{key}.{sub} differs {both(x.get(sub), y.get(sub))}")
        else:
            diffs.append(f"{key} differs {both(x, y)}")
    va, vb = m1.get("versions") or {}, m2.get("versions") or {}
    if va.get("spu") != vb.get("spu"):
        diffs.append(
            f"spu version differs {both(va.get('spu'), vb.get('spu'))}; "
            "install the same psi-run lock on both sides"
        )
    if str(va.get("psi-run")).split(".")[:2] != str(vb.get("psi-run")).split(".")[:2]:
        diffs.append(
            f"psi-run version differs {both(va.get('psi-run'), vb.get('psi-run'))}; "
            "upgrade one side"
        )
    return diffs


def _listed(value: object) -> list | None:
    return value if isinstance(value, list) else None


def _show(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def handshake(
    spec: JobSpec,
    me: str,
    timeout_s: float,
    mode: str = "run",
    progress: Callable[[str], None] = lambda line: None,
    nonce: str = "",
    checkpoint: dict | None = None,
    extra_fields: dict | None = None,
    keys_form: str = "",
    cache: dict | None = None,
    key_codes: tuple[str, ...] = (),
    digest_forms: tuple[str, ...] = (),
) -> Agreement:
    """Wait for the peer (up to ``timeout_s``) and check that it runs the same job.

    ``extra_fields`` are compared like the spec's shared fields but known only after
    preflight (e.g. a salt's fingerprint). ``keys_form`` tells the peer how our keys reach
    SPU (not compared: each side adapts, see ``data``); ``cache`` is this side's unbalanced
    cache offer (``unbalanced.agree`` decides from both). Stops at once with ``PeerError`` when
    the peer sends a failure notice for this attempt. ``key_codes``: how this side can write
    non-plain keys for SPU (``keycode``; each side picks from both lists by the same rule);
    ``digest_forms``: the forms of the result's keys this side can digest (``agreement``)."""
    hs = _Handshake(spec, me, timeout_s, mode, progress, nonce or new_nonce())
    hs.hello["checkpoint"] = checkpoint or {}
    hs.hello["keys_form"] = keys_form
    if key_codes:
        hs.hello["key_codes"] = list(key_codes)
    if digest_forms:
        hs.hello["digest_forms"] = list(digest_forms)
    if cache:
        hs.hello["cache"] = cache
    if extra_fields:
        hs.hello["fields"] = {**hs.hello["fields"], **extra_fields}
    return hs.run()


def new_nonce() -> str:
    """A run's random identity on the control channel."""
    return secrets.token_hex(12)


class _Handshake:
    """One attempt's handshake: HELLOs out, the peer's HELLOs and notices in."""

    def __init__(
        self,
        spec: JobSpec,
        me: str,
        timeout_s: float,
        mode: str,
        progress: Callable[[str], None],
        nonce: str,
    ) -> None:
        self.spec = spec
        self.me = me
        self.peer = spec.peer_of(me)
        self.timeout_s = timeout_s
        self.progress = progress
        self.nonce = nonce
        self.peer_nonce = ""
        self.channel = control_channel(spec, me)
        self.sender = _Sender(self.channel)
        self.hello = {
            "type": "hello",
            "job_id": spec.job_id,
            "party": me,
            "nonce": nonce,
            "seen": "",
            "mode": mode,
            "fields": shared_fields(spec),
            "digest": spec_digest(spec),
            "versions": versions(),
            "sent_at": time.time(),
        }
        # An unaddressed failure notice of the peer, acted on unless a newer HELLO follows.
        self.notice: dict | None = None
        self.notice_deadline = 0.0
        self.broker_down = 0.0  # when our broker first failed to answer (0: it answers)
        # Our broker's word on the peer's broker (a push is answered before it is sent on).
        self.reach = PeerReach(spec.parties[me].broker, me, self.peer, time.time() + timeout_s)

    def run(self) -> Agreement:
        log.info(
            "job %s party %s: handshake: waiting for %s (up to %.0f s)",
            self.spec.job_id,
            self.me,
            self.peer,
            self.timeout_s,
        )
        self.sender.start()
        self.sender.send(dict(self.hello))
        started = time.monotonic()
        next_progress = started + PROGRESS_EVERY_S
        last_send = started
        try:
            while True:
                now = time.monotonic()
                waited = now - started
                if waited > self.timeout_s:
                    raise PeerError(self._timeout_message(), kind="gave up waiting for the peer")
                if self.notice is not None and now >= self.notice_deadline:
                    raise notice.peer_failed(self.spec, self.notice)
                if now >= next_progress:
                    self._waiting(next_progress - started)
                    next_progress += PROGRESS_EVERY_S
                if line := self.reach.poll(now):
                    log.warning("job %s party %s: %s", self.spec.job_id, self.me, line)
                    self.progress(line)
                if self.sender.last_error and now - last_send > RESEND_EVERY_S:
                    self._answer()
                    last_send = now
                msg = self._pop(min(1.0, max(self.timeout_s - waited, 0.05)))
                if msg is None or msg.get("party") != self.peer:
                    continue
                if msg.get("type") == "abort":
                    self._on_notice(msg)
                elif msg.get("type") == "hello":
                    agreed = self._on_hello(msg, started)
                    if agreed is not None:
                        return agreed
                    last_send = time.monotonic()
        finally:
            self.sender.stop()

    def _pop(self, wait_s: float) -> dict | None:
        try:
            msg = self.channel.pop(wait_s)
        except (OSError, ValueError) as exc:
            # A broker restart is ridden out: its durable queues keep what it had accepted.
            now = time.monotonic()
            self.broker_down = self.broker_down or now
            if now - self.broker_down < BROKER_GRACE_S:
                time.sleep(min(wait_s, 0.5))
                return None
            raise PreflightError(
                f"broker {self.spec.parties[self.me].broker} of party {self.me} stopped "
                f"answering during the handshake ({getattr(exc, 'reason', exc)}) for "
                f"{BROKER_GRACE_S:.0f} s; check that it still runs"
            ) from None
        self.broker_down = 0.0
        return msg

    def _answer(self) -> None:
        self.sender.send({**self.hello, "seen": self.peer_nonce})

    def _waiting(self, waited_s: float) -> None:
        error = self.sender.last_error
        extra = f"; {self.reach.describe()}" if self.reach.text else f" ({error})" if error else ""
        self.progress(
            f"waiting for {self.peer} at its broker (job {self.spec.job_id}): "
            f"{waited_s:.0f} s of {self.timeout_s:.0f} s{extra}"
        )

    def _on_notice(self, msg: dict) -> None:
        if msg.get("to") == self.nonce:
            raise notice.peer_failed(self.spec, msg)
        if msg.get("holder") and msg.get("holder") == self.peer_nonce:
            return  # a second run was refused at the peer; the one we talk to goes on
        if not msg.get("to") and notice.is_fresh(msg):
            # Sent before the peer met us: maybe from a run that has been started again since.
            self.notice = msg
            self.notice_deadline = time.monotonic() + NOTICE_GRACE_S

    def _on_hello(self, msg: dict, started: float) -> Agreement | None:
        their_nonce = str(msg.get("nonce", ""))
        if self.notice is not None and (
            notice.sent_at(msg) > notice.sent_at(self.notice)  # started again after its failure
            or self.notice.get("holder") == their_nonce  # the run that refused the other
        ):
            self.notice = None
        if their_nonce != self.peer_nonce:
            self.peer_nonce = their_nonce
            self._answer()
        if msg.get("seen") != self.nonce:
            return None  # not (yet) an answer to this attempt: maybe stale, maybe early
        diffs = _differences(self.spec, self.me, self.hello, self.peer, msg)
        self.sender.flush(10)  # the peer needs our answer to decide too
        if diffs:
            raise PeerError(f"job {self.spec.job_id}: " + "; ".join(diffs), from_peer=True)
        pair = "|".join(sorted([self.nonce, self.peer_nonce]))
        session = f"{self.spec.job_id}.{hashlib.sha256(pair.encode()).hexdigest()[:20]}"
        waited = time.monotonic() - started
        log.info(
            "job %s party %s: handshake with %s done after %.1f s, session %s",
            self.spec.job_id,
            self.me,
            self.peer,
            waited,
            session,
        )
        return Agreement(
            session=session,
            peer_versions=msg.get("versions") or {},
            waited_s=waited,
            nonce=self.nonce,
            peer_nonce=self.peer_nonce,
            peer_checkpoint=msg.get("checkpoint")
            if isinstance(msg.get("checkpoint"), dict)
            else {},
            peer_keys_form=str(msg.get("keys_form", "")),
            peer_cache=msg.get("cache") if isinstance(msg.get("cache"), dict) else {},
            peer_key_codes=msg.get("key_codes") if isinstance(msg.get("key_codes"), list) else None,
            peer_digest_forms=_listed(msg.get("digest_forms")),
        )

    def _timeout_message(self) -> str:
        spec, me, peer = self.spec, self.me, self.peer
        head = f"job {spec.job_id}: {peer} did not appear within {self.timeout_s:.0f} s"
        if self.reach.text:
            return (
                f"{head}: {self.reach.describe()}; check that {peer}'s broker runs and that "
                f"the route to {peer} in {me}'s route_table.json points at it"
            )
        if self.sender.last_error:
            return (
                f"{head}: {me}'s broker cannot deliver to {peer} ({self.sender.last_error}); "
                f"check the route to {peer} in {me}'s route_table.json and that {peer}'s "
                "broker runs"
            )
        if self.peer_nonce:
            return (
                f"{head}: {peer} was seen but never answered; check that {peer}'s broker "
                f"routes back to {me}"
            )
        return (
            f"{head}: start `psi-run {spec.path.name} --party {peer}` on {peer}'s side with "
            f"the same job_id, check that {peer}'s broker runs and routes to {me}, or raise "
            "timeout_s"
        )


def control_channel(spec: JobSpec, me: str) -> _Channel:
    """The control channel of a job (HELLOs, then heartbeats and failure notices)."""
    return _Channel(spec.parties[me].broker, notice.control_session(spec), me, spec.peer_of(me))


def finish(spec: JobSpec, me: str) -> None:
    """Drop this party's leftover control messages at its own broker."""
    control_channel(spec, me).release()
