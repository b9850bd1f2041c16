"""Several jobs at once through one broker pair, and one run at a time of the same job."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    assert_same_rows,
    expected_rows,
    make_ids,
    read_result,
    run_ok,
    wait_for,
    write_csv,
)
from conftest import write_spec as _write_spec

from harness.localnet import psi_run_command
from psi_runner.handshake import _Handshake
from psi_runner.joblock import BUSY_KIND, JobBusy, JobLock, lock_path
from psi_runner.spec import load_spec


def _job(folder: Path, pair, job_id: str, seed: int, protocol: str = "RR22") -> Path:
    rng = random.Random(seed)
    shared = [*make_ids(200, f"s{seed}-", rng), "张三", 'q"x', "a,b"]
    a = shared + make_ids(150, "a", rng)
    b = make_ids(120, "b", rng) + shared
    rng.shuffle(a)
    rng.shuffle(b)
    write_csv(folder / "data/alice.csv", {"uid": a, "n": [str(i) for i in range(len(a))]})
    write_csv(folder / "data/bob.csv", {"uid": b})
    return _write_spec(folder, pair, job_id=job_id, protocol=protocol, timeout_s=120)


def _check(folder: Path) -> None:
    for me, other in (("alice", "bob"), ("bob", "alice")):
        want = expected_rows(folder / f"data/{me}.csv", folder / f"data/{other}.csv", ["uid"])
        assert len(want) == 203
        assert_same_rows(read_result(folder / f"out/{me}_psi.csv"), want)


def _start(spec: Path, party: str) -> subprocess.Popen:
    return subprocess.Popen(
        psi_run_command(spec, party), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_four_jobs_at_once_through_one_broker_pair_each_match_pandas(tmp_path, pair):
    folders = [tmp_path / f"job{i}" for i in range(4)]
    protocols = ["RR22", "KKRT", "RR22", "KKRT"]
    specs = [_job(f, pair, f"many-{i}", i, protocols[i]) for i, f in enumerate(folders)]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = run_ok(specs[i], ["alice", "bob"], timeout_s=180)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, folder in enumerate(folders):
        assert not isinstance(results[i], BaseException), results[i]
        _check(folder)
        assert {r["job_id"] for r in results[i]} == {f"many-{i}"}  # type: ignore[union-attr]


def test_second_run_of_a_running_job_is_refused_at_once_and_the_first_goes_on(tmp_path, pair):
    spec = _job(tmp_path, pair, "once-1", 11)
    first = _start(spec, "alice")  # waits in its handshake for bob
    assert wait_for(lambda: lock_path(load_spec(spec), "alice").exists(), 30.0)
    started = time.monotonic()
    second = subprocess.run(
        psi_run_command(spec, "alice"), capture_output=True, text=True, timeout=60
    )
    assert second.returncode == 3, second.stderr
    assert time.monotonic() - started < 15  # at once, not at a timeout
    assert "another run of this job for party alice is still in progress" in second.stderr
    assert "Traceback" not in second.stderr
    # bob starts after the refusal: he meets the first run (the refusal names it) and the job
    # completes as if nothing had happened.
    bob = _start(spec, "bob")
    for proc in (first, bob):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert json.loads(out)["intersection_count"] == 203
    _check(tmp_path)
    assert not lock_path(load_spec(spec), "alice").exists()
    # The daily rerun in the same place, after the first finished.
    (tmp_path / "out/alice_psi.csv").unlink()
    run_ok(spec, ["alice", "bob"])
    _check(tmp_path)


def test_peer_waiting_for_a_refused_run_stops_with_a_clear_line(tmp_path, pair):
    spec = _job(tmp_path, pair, "once-2", 12)
    # A run of this job at alice that is past its handshake (it never says hello again).
    (tmp_path / "out").mkdir()
    held = JobLock.acquire(load_spec(spec), "alice", "feedface" * 3)
    try:
        bob = _start(spec, "bob")
        alice = subprocess.run(
            psi_run_command(spec, "alice"), capture_output=True, text=True, timeout=60
        )
        assert alice.returncode == 3, alice.stderr
        _, err = bob.communicate(timeout=60)
    finally:
        held.release()
    assert bob.returncode == 4, err
    assert "alice refused to start another run of this job" in err
    assert "still in progress at alice" in err
    assert not (tmp_path / "out/bob_psi.csv").exists()


def test_a_refusal_naming_the_run_we_talk_to_does_not_stop_our_handshake(tmp_path, pair):
    """In-process: the rules that decide whether a refused second run's notice stops the
    handshake (the end-to-end tests above show each outcome, but not this ordering)."""
    spec = load_spec(_job(tmp_path, pair, "once-3", 13))
    busy = {"type": "abort", "party": "alice", "to": "", "stage": "preflight",
            "kind": BUSY_KIND, "holder": "run-1", "sent_at": time.time()}  # fmt: skip
    hello = {"type": "hello", "party": "alice", "nonce": "run-1", "seen": "", "sent_at": 1.0}

    # The HELLO of the run holding the lock came first: the refusal is about another run.
    h = _Handshake(spec, "bob", 10, "run", lambda line: None, "bob-nonce")
    h._on_hello(dict(hello), time.monotonic())
    h._on_notice(dict(busy))
    assert h.notice is None
    # The refusal came first: the holder's HELLO, though older, overrules it.
    h = _Handshake(spec, "bob", 10, "run", lambda line: None, "bob-nonce")
    h._on_notice(dict(busy))
    assert h.notice is not None
    h._on_hello(dict(hello), time.monotonic())
    assert h.notice is None
    # A HELLO of some other run does not: the run we wait for was refused.
    h = _Handshake(spec, "bob", 10, "run", lambda line: None, "bob-nonce")
    h._on_notice(dict(busy))
    h._on_hello({**hello, "nonce": "run-2"}, time.monotonic())
    assert h.notice is not None


def test_the_lock_is_exclusive_released_at_the_end_and_a_killed_runs_file_is_taken_over(
    tmp_path, pair
):
    spec = load_spec(_job(tmp_path, pair, "once-4", 14))
    (tmp_path / "out").mkdir()
    first = JobLock.acquire(spec, "alice", "nonce-1")
    with pytest.raises(JobBusy) as info:
        JobLock.acquire(spec, "alice", "nonce-2")
    assert info.value.holder == "nonce-1"
    assert f"(process {os.getpid()})" in str(info.value)
    assert JobLock.acquire(spec, "bob", "nonce-3").path != first.path  # other party: own lock
    first.release()
    assert not lock_path(spec, "alice").exists()
    # A run killed with SIGKILL leaves its file but no lock: the next run takes it over.
    lock_path(spec, "alice").write_text('{"pid": 999999, "nonce": "dead"}')
    again = JobLock.acquire(spec, "alice", "nonce-4")
    assert "nonce-4" in lock_path(spec, "alice").read_text()
    assert stat.S_IMODE(lock_path(spec, "alice").stat().st_mode) == 0o600
    again.release()
