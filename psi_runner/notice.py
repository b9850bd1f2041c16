"""Failure notices: one side's failure, told to the other through the brokers.

When a run fails at any stage after it knows its job and its broker (preflight, handshake, the
PSI, writing the result, Ctrl-C, a crash of its job process), it pushes one notice on the job's
control channel::

    {type: "abort", party, nonce, to, stage, kind, sent_at}

``stage`` and ``kind`` come from closed sets of words (the failing stage, the category of the
error): a notice never carries data, paths or messages. ``to`` is the peer run's nonce when
this run has met it; a notice addressed to another nonce belongs to another attempt and is
ignored. A run that fails before it met its peer sends an unaddressed notice; the peer takes it
for ``NOTICE_TTL_S`` after it was sent (a peer started after the failure learns of it at once),
unless a newer HELLO of the same party follows it (the party has been started again).

A run refused because another run of the same job is in progress at its side (``joblock``)
sends kind ``BUSY_KIND`` and ``holder``, the nonce of the run in progress: a peer run that
talks to that holder ignores the notice, any other learns why nothing answers it.
"""

from __future__ import annotations

import json
import logging
import re
import time

from broker import codes

from .broker_client import BrokerClient
from .errors import Interrupted, LinkLost, PeerError, PsiRunError, Stalled
from .joblock import BUSY_KIND
from .spec import JobSpec

log = logging.getLogger("psi_runner.notice")

NOTICE_TTL_S = 600.0
SEND_TIMEOUT_S = 10.0
STAGES = ("preflight", "handshake", "prepare", "psi", "agree", "output", "report")
_WORDS = re.compile(r"[^A-Za-z0-9 ,.;:()'/-]")


def control_session(spec: JobSpec) -> str:
    """The session of a job's control channel (HELLOs, heartbeats, notices)."""
    return f"{spec.job_id}.hs"


def control_topic(sender: str, receiver: str) -> str:
    return f"hs-{sender}-{receiver}"


def failure_notice(party: str, stage: str, exc: BaseException, nonce: str, to: str) -> dict:
    """The notice for ``exc`` at ``stage`` (its kind, never its message)."""
    if isinstance(exc, PsiRunError):
        kind = exc.kind
    elif isinstance(exc, KeyboardInterrupt):
        kind = Interrupted.kind
    else:
        kind = PsiRunError.kind
    message = {
        "type": "abort",
        "party": party,
        "nonce": nonce,
        "to": to,
        "stage": stage,
        "kind": kind,
        "sent_at": time.time(),
    }
    holder = getattr(exc, "holder", None)
    if kind == BUSY_KIND and isinstance(holder, str):
        message["holder"] = holder
    return message


def send_notice(spec: JobSpec, me: str, notice: dict) -> bool:
    """Push ``notice`` to the peer through our broker (bounded wait); True if accepted."""
    peer = spec.peer_of(me)
    body = json.dumps(notice, sort_keys=True).encode("utf-8")
    try:
        out = BrokerClient(spec.parties[me].broker).push(
            control_session(spec), control_topic(me, peer), me, peer, body, SEND_TIMEOUT_S
        )
    except (OSError, ValueError) as exc:
        log.warning("could not tell %s that the job failed (%s)", peer, exc)
        return False
    if out.code != codes.OK:
        log.warning("could not tell %s that the job failed (%s %s)", peer, out.code, out.message)
        return False
    log.info("told %s: %s failed during %s (%s)", peer, me, notice["stage"], notice["kind"])
    return True


def is_fresh(notice: dict, now: float | None = None) -> bool:
    """An unaddressed notice counts for ``NOTICE_TTL_S`` after it was sent."""
    sent_at = _number(notice.get("sent_at"))
    return sent_at > 0 and (now or time.time()) - sent_at <= NOTICE_TTL_S


def sent_at(message: dict) -> float:
    return _number(message.get("sent_at"))


def peer_failed(spec: JobSpec, notice: dict) -> PsiRunError:
    """The error this side stops with: who failed, in which stage, what kind (no data)."""
    party = str(notice.get("party"))
    stage = str(notice.get("stage"))
    stage = stage if stage in STAGES else "an unknown stage"
    kind = _WORDS.sub("", str(notice.get("kind", "")))[:80] or "no reason given"
    age = time.time() - sent_at(notice)
    when = f" {age:.0f} s ago" if age >= 5 else ""
    if kind == Stalled.kind:  # both sides stop as for a stall of their own (and may retry)
        return Stalled(
            f"job {spec.job_id}: {party} found that the PSI made no progress on either side "
            f"(stalled during {stage}){when}; it was stopped and no result was written"
        )
    if kind == LinkLost.kind:  # both sides start the job again (the CLI bounds how often)
        return LinkLost(
            f"job {spec.job_id}: {party}'s SPU link did not reconnect to {party}'s broker after "
            f"it came back (during {stage}){when}; this attempt was stopped at both sides"
        )
    if kind == LinkLost.final_kind:
        return LinkLost(
            f"job {spec.job_id}: {party}'s SPU link did not reconnect to {party}'s broker after "
            f"it came back (during {stage}){when}, and no automatic restart was left; no result "
            "was written; run the job again",
            restart=False,
            from_peer=True,
        )
    if kind == BUSY_KIND:
        return PeerError(
            f"job {spec.job_id}: {party} refused to start another run of this job{when}: a run "
            f"of it is still in progress at {party} and is not talking to this one; run the "
            f"job again at both sides when {party}'s run has finished",
            kind="the peer failed",
            from_peer=True,
        )
    if kind == Interrupted.kind:
        what = f"{party} was interrupted (Ctrl-C, SIGINT or SIGTERM) during {stage}{when}"
    else:
        what = f"{party} failed during {stage}{when}: {kind}"
    return PeerError(
        f"job {spec.job_id}: {what}; no result was written; {party}'s log says why",
        kind="the peer failed",
        from_peer=True,
    )


def _number(value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return number if number == number and abs(number) < 1e12 else 0.0
