"""The result agreement check: after the PSI and before any result is published, both parties
prove to each other that SPU gave them the same answer.

Each side sends, on the job's control session (topic ``ag-<sender>-<receiver>``)::

    {type: "agree", party, nonce, to, count, rows, digest}

``count`` is the size of the intersection (rows of the result for ``join: inner``, SPU's
count for the other joins), ``rows`` the rows of this party's result file, and ``digest`` a
keyed BLAKE2b of the result's keys in result order (``join: inner`` only: the other joins
pad with rows only one side has). The key is derived from both handshake nonces, so a digest
means nothing outside this run. Keys that reached SPU in the ``escape`` code may be digested
as SPU's texts, when both sides can (``SPU_TEXT``). A difference fails both sides
(``ResultsDisagree``, exit 5) and no result is written.

What it reveals: with ``broadcast_result: true`` both sides get the whole result anyway.
With a receiver-only result the sender knows nothing of it: it sends its SPU count only when
SPU gave it one, and the receiver answers with its own count only then; otherwise the check
says plainly that nothing could be compared.

While it waits, a side beats on the control channel as during the PSI (the peer's watchdog may
still be running) and stops on the peer's failure notice or after its silence.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from broker import codes

from . import notice
from .arrowbits import string_parts
from .broker_client import BROKER_GRACE_S, BrokerClient
from .errors import PeerError, ResultsDisagree
from .handshake import Agreement, control_channel
from .spec import JobSpec

log = logging.getLogger("psi_runner.agreement")

# Test-only: set to a party's name, that party drops the last row of its result before the
# check, as a lost row would look. Read only when set; never set it in production.
TEST_DROP_ENV = "PSI_RUN_TEST_DROP_RESULT_ROW"
# A side whose SPU input holds ``escape``-coded keys may digest the key texts SPU compared (its
# output's key column as it is) instead of decoding them back to values first: the digests
# still agree exactly when the results do (the code is injective and the same at both sides,
# and a plain value is its own canonical key). Both sides say in the handshake that they can;
# a peer that does not say it decodes, and then this side decodes too.
SPU_TEXT = "spu-text"
DIGEST_FORMS = (SPU_TEXT,)  # what this version can digest besides the values, told to the peer
# test-only: the party named here says nothing of digest forms, as an earlier version
TEST_NO_FORMS_ENV = "PSI_RUN_TEST_NO_DIGEST_FORMS"


def digest_forms(party: str) -> tuple[str, ...]:
    """The digest forms ``party`` tells its peer in the handshake."""
    return () if os.environ.get(TEST_NO_FORMS_ENV) == party else DIGEST_FORMS


BEAT_EVERY_S = 3.0


@dataclass(frozen=True)
class Summary:
    """What one side tells the other about its result (numbers and a keyed digest)."""

    count: int | None  # None: SPU did not tell this side
    rows: int | None = None
    digest: str | None = None


def test_drop_requested(party: str) -> bool:
    """The test-only hook (``PSI_RUN_TEST_DROP_RESULT_ROW``) asks this party to lose a row."""
    value = os.environ.get(TEST_DROP_ENV)
    return value is not None and value == party


def digest_key(nonce: str, peer_nonce: str) -> bytes:
    """The run's key for result digests: both handshake nonces, the same at both sides."""
    pair = "|".join(sorted([nonce, peer_nonce]))
    return hashlib.sha256(b"psi-run result check\0" + pair.encode()).digest()


_OFFSETS_AT_ONCE = 1 << 20  # offsets widened and hashed at a time (8 MB)


def keys_digest(columns: list[pa.Array | pa.ChunkedArray], key: bytes) -> str:
    """Keyed BLAKE2b of the key columns' values in order (lengths and bytes, unambiguous):
    for each column its value count, its offsets from 0 as 64-bit integers, then its bytes.

    Chunk by chunk and a million offsets at a time, with no copy of the column: at 100M rows
    a result of 50M keys is 0.75 GB as read, and a combined ``large_string`` copy of it with
    its offsets written out again held about 2 GB more."""
    h = hashlib.blake2b(key=key, digest_size=32)
    for column in columns:
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        parts = [string_parts(chunk) for chunk in chunks]
        h.update(sum(len(c) for c in chunks).to_bytes(8, "little"))
        h.update(np.zeros(1, dtype=np.int64).tobytes())  # the first offset
        done = 0  # bytes of the values before this chunk
        for offsets, _ in parts:
            for at in range(1, len(offsets), _OFFSETS_AT_ONCE):
                part = offsets[at : at + _OFFSETS_AT_ONCE].astype(np.int64)
                part += done - int(offsets[0])
                h.update(part.tobytes())
            done += int(offsets[-1]) - int(offsets[0])
        for offsets, body in parts:
            if body is not None:
                h.update(memoryview(body)[int(offsets[0]) : int(offsets[-1])])
    return h.hexdigest()


def check(spec: JobSpec, me: str, agreed: Agreement, mine: Summary) -> dict[str, object]:
    """Exchange summaries with the peer and compare them; the report's ``agreement`` entry.

    Raises ResultsDisagree when the two results differ, PeerError when the peer fails or
    falls silent first."""
    peer = spec.peer_of(me)
    talk = _Talk(spec, me, agreed)
    if spec.broadcast_result:
        talk.send(mine)
        return _compare(spec, me, mine, talk.receive())
    if me != spec.receiver:  # the sender: it tells only what SPU told it
        talk.send(Summary(mine.count))
        if mine.count is None:
            return _unchecked(spec)
        return _compare(spec, me, Summary(mine.count), talk.receive())
    theirs = talk.receive()
    if theirs.count is None:
        return _unchecked(spec)
    talk.send(Summary(mine.count))
    log.info("job %s party %s: %s's SPU count compared", spec.job_id, me, peer)
    return _compare(spec, me, Summary(mine.count), Summary(theirs.count))


def _unchecked(spec: JobSpec) -> dict[str, object]:
    sender = spec.peer_of(spec.receiver)
    return {
        "checked": "nothing",
        "why": f"only {spec.receiver} receives the result and SPU tells {sender} nothing of it",
    }


def _compare(spec: JobSpec, me: str, mine: Summary, theirs: Summary) -> dict[str, object]:
    peer = spec.peer_of(me)
    order = spec.party_names
    a, b = (mine, theirs) if order.index(me) < order.index(peer) else (theirs, mine)
    p1, p2 = order
    what = []
    if a.count != b.count:
        what.append(f"{p1}: {_n(a.count)}, {p2}: {_n(b.count)} in the intersection")
    elif a.rows != b.rows:
        what.append(f"{p1}: {_n(a.rows)}, {p2}: {_n(b.rows)} result rows")
    if not what and a.digest != b.digest:
        what.append(f"both {_n(a.count)}, but the keys or their order differ")
    if what:
        raise ResultsDisagree(
            f"job {spec.job_id}: the two parties' results disagree ({'; '.join(what)}); "
            "no result was written at either side; run the job again and report it if it "
            "repeats (SPU returned different answers)",
            from_peer=True,  # the peer finds the same difference itself: nothing to announce
        )
    checked = "count and keys in result order" if mine.digest else "counts"
    return {"checked": checked, "count": mine.count}


def _n(value: int | None) -> str:
    return "unknown" if value is None else f"{value:,}"


class _Talk:
    """The check's messages through our broker, with beats and the peer's notices."""

    def __init__(self, spec: JobSpec, me: str, agreed: Agreement) -> None:
        self.spec = spec
        self.me = me
        self.peer = spec.peer_of(me)
        self.agreed = agreed
        self.client = BrokerClient(spec.parties[me].broker)
        self.session = notice.control_session(spec)
        self.control = control_channel(spec, me)
        self.silence_s = float(os.environ.get("PSI_RUN_PEER_SILENCE_S", "90"))
        self.down_since = 0.0  # when our broker first failed to answer (0: it answers)

    def send(self, summary: Summary) -> None:
        body = {"type": "agree", "party": self.me, "nonce": self.agreed.nonce,
                "to": self.agreed.peer_nonce, "count": summary.count, "rows": summary.rows,
                "digest": summary.digest}  # fmt: skip
        while True:
            try:
                out = self.client.push(
                    self.session,
                    f"ag-{self.me}-{self.peer}",
                    self.me,
                    self.peer,
                    json.dumps(body, sort_keys=True).encode(),
                    30.0,
                )
                break
            except (OSError, ValueError) as exc:
                self._broker_away(exc)
        self.down_since = 0.0
        if out.code != codes.OK:
            raise PeerError(self._broken(f"{out.code} {out.message}"))

    def receive(self) -> Summary:
        """The peer's summary; stops on its failure notice or its silence."""
        heard = next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now - heard > self.silence_s:
                raise PeerError(
                    f"job {self.spec.job_id}: no sign of {self.peer} for {self.silence_s:.0f} s "
                    "during the result check; no result was written; check its log and run "
                    "the job again"
                )
            if now >= next_beat:
                self._beat()
                next_beat = now + BEAT_EVERY_S
            msg = self._pop(f"ag-{self.peer}-{self.me}", 1.0)
            if msg is not None and msg.get("type") == "agree":
                return Summary(
                    _int(msg.get("count")), _int(msg.get("rows")), _text(msg.get("digest"))
                )
            control = self._pop(notice.control_topic(self.peer, self.me), 0.1)
            if control is not None:
                heard = time.monotonic()
                if control.get("type") == "abort":
                    raise notice.peer_failed(self.spec, control)

    def _pop(self, topic: str, wait_s: float) -> dict | None:
        """The next message of this attempt's peer on ``topic``, if any."""
        try:
            out = self.client.pop(self.session, topic, self.me, wait_s)
        except (OSError, ValueError) as exc:
            self._broker_away(exc)
            return None
        self.down_since = 0.0
        if out.code != codes.OK or not out.payload:
            return None
        try:
            msg = json.loads(out.payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        if not isinstance(msg, dict) or msg.get("nonce") != self.agreed.peer_nonce:
            return None  # another run's message
        return msg if msg.get("to") == self.agreed.nonce else None

    def _broker_away(self, exc: Exception) -> None:
        """Our broker did not answer: wait a moment (it may be restarting; its durable queues
        keep what it accepted), or fail once it has been away for BROKER_GRACE_S."""
        now = time.monotonic()
        self.down_since = self.down_since or now
        if now - self.down_since >= BROKER_GRACE_S:
            raise PeerError(self._broken(f"own broker did not answer: {exc}")) from None
        time.sleep(0.5)

    def _beat(self) -> None:
        beat = {"type": "beat", "party": self.me, "nonce": self.agreed.nonce,
                "to": self.agreed.peer_nonce}  # fmt: skip
        try:
            self.control.push(beat)
        except (OSError, ValueError):
            pass  # a dead broker shows in the next pop

    def _broken(self, why: str) -> str:
        return (
            f"job {self.spec.job_id}: the result check with {self.peer} could not be sent "
            f"({why[:80]}); no result was written; check {self.me}'s broker and run the job again"
        )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: object) -> str | None:
    return value[:128] if isinstance(value, str) else None
