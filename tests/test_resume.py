"""Interrupted jobs resume from SPU's checkpoint when both sides agree, else start afresh.

Both runners are SIGKILLed while SPU's PSI is under way; the checkpoint folders stay (0700).
The rerun resumes (both sides say so) and its result matches pandas; a changed input, or
``--fresh``, makes both start from the beginning, saying why. SPU 0.9.3b0 resumes from its
last finished bucket of 2^20 keys; these inputs are one bucket, so the rerun redoes the PSI
but goes through SPU's whole recovery path (the time saved at scale is measured in the
benchmark notes, not here).
"""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import make_ids, read_result, wait_for, write_csv, write_spec

from harness.localnet import psi_run_command, run_parties

ROWS = 200_000


@pytest.fixture(params=["KKRT", "RR22"])
def job(tmp_path, brokers, request):
    rng = random.Random(3)
    shared = make_ids(ROWS // 2, "s", rng)
    write_csv(tmp_path / "data/alice.csv", {"uid": shared + make_ids(ROWS // 2, "a", rng)})
    write_csv(tmp_path / "data/bob.csv", {"uid": shared + make_ids(ROWS // 2, "b", rng)})
    return write_spec(tmp_path, brokers, job_id="resume-t", protocol=request.param, timeout_s=120)


def _kill_both_during_the_psi(spec: Path) -> None:
    procs = [
        subprocess.Popen(
            psi_run_command(spec, p), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for p in ("alice", "bob")
    ]
    logs = spec.parent / "logs"
    started = wait_for(
        lambda: all(
            any("Online] start" in f.read_text(errors="replace") for f in logs.glob(f"*-{p}-*"))
            for p in ("alice", "bob")
        ),
        90,
    )
    for proc in procs:
        proc.send_signal(signal.SIGKILL)  # the job processes die with them (PDEATHSIG)
        proc.wait()
    assert started, "the PSI did not start"


def _checkpoints(folder: Path) -> list[Path]:
    return sorted((folder / "out").glob(".psi-run-*.ckpt"))


def _assert_right(folder: Path, results) -> None:
    for r in results:
        assert r.returncode == 0, r.stderr
    got = read_result(folder / "out/alice_psi.csv")
    assert len(got) == ROWS // 2 and got["uid"].str.startswith("s").all()
    assert _checkpoints(folder) == []  # removed once the job succeeded


def test_killed_job_resumes_from_the_checkpoint_on_both_sides(job):
    folder = job.parent
    _kill_both_during_the_psi(job)
    kept = _checkpoints(folder)
    assert [p.name for p in kept] == [".psi-run-alice-resume-t.ckpt", ".psi-run-bob-resume-t.ckpt"]
    for path in kept:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        assert (path / "spu" / "checkpoint.json").exists()

    results = run_parties(job, ["alice", "bob"], timeout_s=180)

    for r in results:
        assert "resuming from the checkpoint of an earlier attempt" in r.stderr, r.stderr
    _assert_right(folder, results)


@pytest.mark.parametrize("why", ["changed input", "fresh"])
def test_a_changed_input_or_fresh_starts_both_sides_from_the_beginning(job, why):
    folder = job.parent
    _kill_both_during_the_psi(job)
    assert len(_checkpoints(folder)) == 2
    extra = []
    if why == "changed input":
        with open(folder / "data/bob.csv", "a", encoding="utf-8") as fh:
            fh.write("b-new-row\n")
        expected = "starting from the beginning: bob has a different input than its checkpoint"
    else:
        extra = ["--fresh"]
        expected = "starting from the beginning:"

    results = run_parties(job, ["alice", "bob"], timeout_s=180, extra_args=extra)

    for r in results:
        assert expected in r.stderr, r.stderr
        assert "resuming" not in r.stderr
    _assert_right(folder, results)
