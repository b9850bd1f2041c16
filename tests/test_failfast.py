"""A failure on either side stops both: the failing party tells its peer through the brokers.

Real brokers and real psi-run processes. The healthy party must stop within 10 s of the
failure, with exit code 4 and one line naming the failing party, the stage and the kind of
failure, and nothing of the other side's data: no path, no file content, no key value.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import wait_for, write_csv, write_spec

from harness.localnet import psi_run_command

SECRET_KEY = "k-secret-7731"  # a key value that must never reach the peer


def _break(folder: Path, party: str, how: str) -> None:
    """Make ``party``'s side fail its preflight in one of several ways."""
    path = folder / f"data/{party}.csv"
    if how == "missing input":
        path.unlink()
    elif how == "duplicate keys":
        write_csv(path, {"uid": [SECRET_KEY, SECRET_KEY, "u1"]})
    elif how == "missing key column":
        write_csv(path, {"id": [SECRET_KEY, "u1"]})
    elif how == "output is a folder":
        (folder / f"out/{party}_psi.csv").mkdir(parents=True)


def _start(spec: Path, party: str) -> subprocess.Popen:
    return subprocess.Popen(
        psi_run_command(spec, party),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if not ln.startswith("psi-run: progress:")]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("failing_first", [False, True], ids=["failing-last", "failing-first"])
@pytest.mark.parametrize("failing", ["alice", "bob"])
@pytest.mark.parametrize(
    "how", ["missing input", "duplicate keys", "missing key column", "output is a folder"]
)
def test_preflight_failure_stops_the_peer_within_seconds(
    tmp_path, pair, how, failing, failing_first
):
    job_id = f"ff-{failing}-{int(failing_first)}-{how.replace(' ', '-')}"
    write_csv(tmp_path / "data/alice.csv", {"uid": ["u1", "u2", "a9"]})
    write_csv(tmp_path / "data/bob.csv", {"uid": ["u1", "u3", "b9"]})
    spec = write_spec(tmp_path, pair, job_id=job_id, timeout_s=120)
    _break(tmp_path, failing, how)
    healthy = "bob" if failing == "alice" else "alice"

    if failing_first:
        bad = _start(spec, failing)
        _, bad_err = bad.communicate(timeout=60)
        failed_at = time.monotonic()
        good = _start(spec, healthy)
    else:
        good = _start(spec, healthy)
        assert wait_for(lambda: _has_log(tmp_path, healthy, "input has"), 60)
        bad = _start(spec, failing)
        _, bad_err = bad.communicate(timeout=60)
        failed_at = time.monotonic()
    out, err = good.communicate(timeout=60)
    stopped_after = time.monotonic() - failed_at

    assert bad.returncode == 3, bad_err
    assert good.returncode == 4, err
    assert out == ""
    line = _last_line(err)
    assert f"{failing} failed during preflight" in line, err
    assert "a local check failed" in line
    assert stopped_after < 10, f"{healthy} stopped {stopped_after:.1f} s after the failure"
    # Nothing of the failing side's data: no key value, no path, no file name.
    told = "\n".join(ln for ln in err.splitlines() if not ln.startswith("psi-run: log file"))
    for secret in (SECRET_KEY, str(tmp_path), f"{failing}.csv", "uid"):
        assert secret not in told, f"{secret!r} leaked to {healthy}: {err}"
    assert "Traceback" not in err + bad_err
    assert not (tmp_path / f"out/{healthy}_psi.csv").exists()


def _has_log(folder: Path, party: str, text: str) -> bool:
    return any(
        text in p.read_text(errors="replace") for p in (folder / "logs").glob(f"*-{party}-*.log")
    )


def test_a_rerun_after_a_failure_is_not_stopped_by_the_old_notice(tmp_path, pair):
    """alice fails, is fixed and started again before bob: bob meets the new alice."""
    write_csv(tmp_path / "data/alice.csv", {"uid": ["u1", "u2"]})
    write_csv(tmp_path / "data/bob.csv", {"uid": ["u1", "u3"]})
    spec = write_spec(tmp_path, pair, job_id="ff-rerun", timeout_s=60)
    _break(tmp_path, "alice", "duplicate keys")
    bad = _start(spec, "alice")
    bad.communicate(timeout=60)
    assert bad.returncode == 3
    write_csv(tmp_path / "data/alice.csv", {"uid": ["u1", "u2"]})
    alice = _start(spec, "alice")
    assert wait_for(lambda: _count_logs(tmp_path, "alice") == 2, 30)
    time.sleep(1.0)  # the new alice's HELLO is queued behind the old notice
    bob = _start(spec, "bob")
    _, bob_err = bob.communicate(timeout=90)
    _, alice_err = alice.communicate(timeout=90)
    assert (alice.returncode, bob.returncode) == (0, 0), alice_err + bob_err


def _count_logs(folder: Path, party: str) -> int:
    return len(list((folder / "logs").glob(f"*-{party}-*.log")))


def test_a_crashed_job_process_is_announced_by_its_parent(tmp_path, pair):
    """SIGKILL of alice's job process while it waits for bob: the supervising parent tells
    bob, who stops at once when it starts instead of waiting out its timeout."""
    write_csv(tmp_path / "data/alice.csv", {"uid": ["u1", "u2"]})
    write_csv(tmp_path / "data/bob.csv", {"uid": ["u1", "u3"]})
    spec = write_spec(tmp_path, pair, job_id="ff-crash", timeout_s=120)
    alice = _start(spec, "alice")
    # In the handshake: its parent has seen the stage begin before this line reached the log.
    assert wait_for(lambda: _has_log(tmp_path, "alice", "handshake: waiting for bob"), 60)
    child = Path(f"/proc/{alice.pid}/task/{alice.pid}/children").read_text().split()
    assert child, "alice's job process not found"
    os.kill(int(child[0]), signal.SIGKILL)
    _, alice_err = alice.communicate(timeout=60)
    assert alice.returncode == 6, alice_err
    started = time.monotonic()
    bob = _start(spec, "bob")
    _, bob_err = bob.communicate(timeout=60)
    assert bob.returncode == 4, bob_err
    line = _last_line(bob_err)
    assert "alice failed during handshake" in line and "the PSI engine crashed" in line, bob_err
    assert time.monotonic() - started < 15


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_a_crash_of_spus_own_process_ends_both_sides_and_leaves_nothing(tmp_path, pair):
    """The PSI runs in a child of the job process (its memory goes with it). SIGABRT there, as
    an SPU CHECK failure does, mid-PSI: alice ends with exit 6 and the engine-crash line, bob
    is told within seconds, and neither leaves a result or a work folder behind (only its
    private checkpoint)."""
    ids = [f"id{i:07d}" for i in range(400_000)]
    write_csv(tmp_path / "data/alice.csv", {"uid": ids[:300_000]})
    write_csv(tmp_path / "data/bob.csv", {"uid": ids[100_000:]})
    spec = write_spec(tmp_path, pair, job_id="ff-spu-crash", timeout_s=120)
    alice, bob = _start(spec, "alice"), _start(spec, "bob")
    spu = []

    def spu_started() -> bool:  # runner -> job process -> SPU's process
        spu[:] = [c for job in _children(alice.pid) for c in _children(job)]
        return bool(spu)

    assert wait_for(spu_started, 60), "alice's SPU process never started"
    os.kill(spu[0], signal.SIGABRT)
    killed = time.monotonic()
    _, alice_err = alice.communicate(timeout=60)
    _, bob_err = bob.communicate(timeout=60)
    assert alice.returncode == 6, alice_err
    assert "the PSI engine crashed (SIGABRT); no result was written" in _last_line(alice_err)
    assert bob.returncode == 4, bob_err
    assert "alice failed during psi" in _last_line(bob_err), bob_err
    assert time.monotonic() - killed < 20
    assert "Traceback" not in alice_err + bob_err
    assert not list((tmp_path / "out").glob("*_psi.csv"))
    left = list(tmp_path.rglob(".psi-run-*"))
    # only the checkpoints, kept private for a rerun to resume from (``test_resume``)
    assert sorted(p.name for p in left) == [
        f".psi-run-{p}-ff-spu-crash.ckpt" for p in ("alice", "bob")
    ]
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in left)
