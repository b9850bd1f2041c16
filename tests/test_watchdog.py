"""A side that dies or loses its broker after the handshake ends both runs quickly."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

from conftest import leftovers, make_ids, wait_for, write_csv, write_spec

from harness.localnet import psi_run_command


def _start(spec, party, env=None):
    return subprocess.Popen(
        psi_run_command(spec, party),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def test_peer_killed_after_handshake_ends_the_other_side_readably(tmp_path, brokers):
    rng = random.Random(2)
    write_csv(tmp_path / "data/alice.csv", {"uid": make_ids(2000, "a", rng)})
    # bob's input needs the slow path (non-ASCII keys), so bob is busy for a while after the
    # handshake: that is when it gets killed.
    write_csv(tmp_path / "data/bob.csv", {"uid": [f"ü{i}" for i in range(400_000)]})
    spec = write_spec(tmp_path, brokers, protocol="ECDH")
    env = {"PSI_RUN_PEER_SILENCE_S": "15"}
    a = _start(spec, "alice", env)
    b = _start(spec, "bob", env)
    assert wait_for(lambda: "handshake with alice done" in _log(tmp_path, "bob"), 60)
    os.killpg(b.pid, signal.SIGKILL)
    b.wait()
    t = time.monotonic()
    _out, err = a.communicate(timeout=120)
    assert time.monotonic() - t < 60
    assert a.returncode == 4, err
    assert "no sign of bob for 15 s" in err and "Traceback" not in err
    assert not (tmp_path / "out/alice_psi.csv").exists()
    assert leftovers(tmp_path / "out", "alice") == []  # nothing of alice but its checkpoint


def test_brokers_gone_during_the_psi_end_both_runs_with_a_small_log(tmp_path, brokers):
    """Both brokers die in the middle of the PSI. SPU's link then logs an error per failed
    poll in a tight loop (about 30 MB/s); both runs still end readably within the broker
    grace period, and the log pump keeps each log file small."""
    ids = [f"id{i:07d}" for i in range(400_000)]
    write_csv(tmp_path / "data/alice.csv", {"uid": ids}, "\n")
    write_csv(tmp_path / "data/bob.csv", {"uid": ids[::3]}, "\n")
    spec = write_spec(tmp_path, brokers, protocol="KKRT")
    a = _start(spec, "alice")
    b = _start(spec, "bob")
    assert wait_for(lambda: "PsiReceiver::Init" in _log(tmp_path, "alice"), 60)
    for broker in brokers:
        broker.proc.kill()
        broker.proc.wait()
    t = time.monotonic()
    for proc in (a, b):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 4, err
        assert "stopped answering during the PSI" in err and "Traceback" not in err
    assert time.monotonic() - t < 60
    for party in ("alice", "bob"):
        log = next((tmp_path / "logs").glob(f"*-{party}-*.log"))
        assert log.stat().st_size < 5_000_000, f"{party}'s log grew to {log.stat().st_size}"
        assert not (tmp_path / f"out/{party}_psi.csv").exists()
    assert "more times (not written)" in _log(tmp_path, "alice")


def _log(folder, party) -> str:
    logs = list((folder / "logs").glob(f"*-{party}-*.log"))
    return logs[0].read_text(errors="replace") if logs else ""


def test_work_folders_of_killed_runs_are_removed_by_the_next_run(tmp_path):
    from psi_runner.workdir import remove_stale_work_dirs

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".psi-run-alice-{dead.pid}-abc123"
    live = tmp_path / f".psi-run-alice-{os.getpid()}-def456"
    other = tmp_path / f".psi-run-bob-{dead.pid}-ghi789"
    for d in (stale, live, other):
        d.mkdir()
        (d / "spu_input.csv").write_text("psi_key,psi_row\n")
    assert remove_stale_work_dirs(tmp_path, "alice") == [stale]
    assert not stale.exists() and live.exists() and other.exists()


def test_a_crash_of_the_job_process_is_one_readable_line(tmp_path, brokers):
    """SIGABRT in the job process (what an SPU CHECK failure does) ends the run with exit
    code 6 and one line; everything the job had written so far is in its log file."""
    write_csv(tmp_path / "data/alice.csv", {"uid": ["1", "2"]})
    spec = write_spec(tmp_path, brokers, timeout_s=120)
    a = _start(spec, "alice")  # bob never comes: alice waits in the handshake
    assert wait_for(lambda: "input has 2 rows" in _log(tmp_path, "alice"), 60)
    children = Path(f"/proc/{a.pid}/task/{a.pid}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGABRT)
    _, err = a.communicate(timeout=60)
    assert a.returncode == 6
    assert "the PSI engine crashed (SIGABRT); no result was written" in err
    assert "Traceback" not in err
    assert "input has 2 rows" in _log(tmp_path, "alice")
