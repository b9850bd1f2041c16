"""A broker restart is invisible to a running job.

Either party's broker (or both) is SIGKILLed at a point of a real RR22 or ECDH job (the
handshake, the SPU link set-up, the PSI's data phase, its result phase) and started again on
the same ports 3 s later, well within ``forward.retry.timeout``. Every job finishes with the
result pandas computes; none hangs. A message the killed broker had answered OK for was on its
disk; one it had handed out unconfirmed is offered again and SPU's link drops the repeat.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    ECDH_LINK,
    assert_same_rows,
    expected_rows,
    make_ids,
    read_result,
    write_csv,
    write_spec,
)

from harness.localnet import LocalBroker, run_parties

ROWS = 200_000
PAUSE_S = 3.0

# (protocol, whose broker dies, the log line that marks the moment)
POINTS = [
    ("RR22", "bob", "input has"),  # both runners are in the handshake
    ("RR22", "alice", "handshake with"),  # SPU's link is being set up
    ("RR22", "bob", "Online] start"),  # the PSI's data phase
    ("RR22", "both", "Online] start"),
    ("RR22", "alice", "PostProcess] start"),  # the result phase
    ("ECDH", "bob", "handshake with"),
    # SPU's HTTP client (brpc) often never reconnects to its broker restarted here: psi-run
    # notices (SPU stops calling the broker that answers again) and starts the job again.
    ("ECDH", "alice", "Online] start"),
]
RELINK = "starting the job again: SPU's link did not reconnect"


def _kill_and_restart_at(mark: str, victims: list[LocalBroker], logs: Path, done: dict) -> None:
    # The mark must be in each victim's own job log: a broker killed before its runner has
    # checked it fails that runner's preflight (a different case: see test_failfast).
    def seen(party: str) -> bool:
        return any(mark in f.read_text(errors="replace") for f in logs.glob(f"job-{party}-*"))

    deadline = time.monotonic() + 120
    while not all(seen(b.party) for b in victims):
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)
    for b in victims:
        b.kill()
    done["killed"] = True
    time.sleep(PAUSE_S)
    for b in victims:
        b.restart()


@pytest.mark.parametrize("protocol,who,mark", POINTS, ids=["-".join(p) for p in POINTS])
def test_job_survives_a_broker_sigkill_and_restart(tmp_path, brokers, protocol, who, mark):
    rng = random.Random(hash((protocol, who, mark)) & 0xFFFF)
    shared = make_ids(ROWS // 2, "s", rng)
    write_csv(tmp_path / "data/alice.csv", {"uid": shared + make_ids(ROWS // 2, "a", rng)})
    write_csv(tmp_path / "data/bob.csv", {"uid": make_ids(ROWS // 3, "b", rng) + shared})
    extra = {"link": ECDH_LINK} if protocol == "ECDH" else {}
    spec = write_spec(tmp_path, brokers, job_id="restart-t", protocol=protocol, **extra)
    victims = [b for b in brokers if who in (b.party, "both")]
    # SPU 0.9.3b0's ECDH sometimes stalls for good on its own (see ECDH_LINK in conftest):
    # such an attempt is run again, with a broker killed again at the same point.
    for attempt in range(2 if protocol == "ECDH" else 1):
        done: dict = {}
        logs = tmp_path / "logs" / str(attempt)
        killer = threading.Thread(target=_kill_and_restart_at, args=(mark, victims, logs, done))
        killer.start()
        try:
            results = run_parties(spec, ["alice", "bob"], timeout_s=180, log_dir=logs)
        finally:
            killer.join()
        assert done.get("killed"), f"the job never reached {mark!r}"
        if not any("receive timeout" in r.stderr for r in results):
            break
    for party, r in zip(("alice", "bob"), results):
        assert r.returncode == 0, f"{party} failed ({r.returncode}): {r.stderr}"
        if RELINK in r.stderr:  # then both sides started again, and the one that saw it says so
            assert all(RELINK in q.stderr for q in results), [q.stderr for q in results]
            assert any(
                f"{v.party}'s SPU link did not reconnect to its broker" in q.stderr
                and "SPU stage " in q.stderr
                for v in victims
                for q in results
            ), r.stderr
    if who == "bob" and mark == "Online] start":
        # alice's broker kept forwarding to bob's while it was away
        log = (brokers[0].conf_dir / "logs" / "broker.log").read_text(encoding="utf-8")
        assert "unreachable, retrying" in log
    for me, other in (("alice", "bob"), ("bob", "alice")):
        want = expected_rows(tmp_path / f"data/{me}.csv", tmp_path / f"data/{other}.csv", ["uid"])
        assert_same_rows(read_result(tmp_path / f"out/{me}_psi.csv"), want)
