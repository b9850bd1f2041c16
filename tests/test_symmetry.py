"""Refusals before any SPU link: mismatched specs, absent or late peers, stale sessions."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import yaml
from conftest import (
    assert_same_rows,
    expected_rows,
    make_ids,
    read_result,
    run_ok,
    write_csv,
    write_spec,
)

from harness.localnet import psi_run_command, run_parties
from psi_runner.handshake import _differences, versions
from psi_runner.spec import load_spec


def _data(folder: Path, seed: int = 1) -> None:
    rng = random.Random(seed)
    shared = make_ids(200, "s", rng)
    write_csv(folder / "data/alice.csv", {"uid": shared + make_ids(100, "a", rng)})
    write_csv(folder / "data/bob.csv", {"uid": make_ids(80, "b", rng) + shared})


def _spec_for(folder: Path, brokers, name: str, **overrides) -> Path:
    """A separate spec file (as each organisation keeps its own copy)."""
    sub = folder / name
    sub.mkdir(exist_ok=True)
    path = write_spec(folder, brokers, **overrides)
    target = sub / "job.yaml"
    doc = yaml.safe_load(path.read_text())
    for p in doc["parties"].values():  # keep data and outputs in the shared folder
        p["input"] = str(folder / p["input"])
        p["output"] = str(folder / p["output"])
    target.write_text(yaml.safe_dump(doc, sort_keys=False))
    return target


def _start(spec: Path, party: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        psi_run_command(spec, party, None, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _assert_refused(proc_result, code: int, *needles: str) -> None:
    _out, err = proc_result
    assert "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def test_peer_with_other_protocol_is_refused_before_link(tmp_path, brokers):
    _data(tmp_path)
    a = _start(_spec_for(tmp_path, brokers, "a", protocol="ECDH"), "alice")
    b = _start(_spec_for(tmp_path, brokers, "b", protocol="KKRT"), "bob")
    t = time.monotonic()
    results = [p.communicate(timeout=120) for p in (a, b)]
    assert time.monotonic() - t < 30
    for p, res in zip((a, b), results):
        assert p.returncode == 4
        _assert_refused(res, 4, "job t-001: protocol differs (alice: ECDH, bob: KKRT)")
    # Nothing of the SPU link was made: no result file, and the SPU session never appeared.
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.csv"))
    assert "topic:alice-bob" not in brokers[0].flow_log()


def test_every_differing_field_is_named_with_both_values(tmp_path, brokers):
    _data(tmp_path)
    a = _start(_spec_for(tmp_path, brokers, "a", receiver="alice", keys=["uid"]), "alice")
    b = _start(
        _spec_for(
            tmp_path,
            brokers,
            "b",
            receiver="bob",
            broadcast_result=False,
            link={"connect_retry_times": 90},
        ),
        "bob",
    )
    results = [p.communicate(timeout=120) for p in (a, b)]
    for p, (_out, err) in zip((a, b), results):
        assert p.returncode == 4
        assert "receiver differs" in err and "broadcast_result differs" in err
        assert "link.connect_retry_times differs" in err
    assert "(alice: alice, bob: bob)" in results[0][1]


def test_peer_that_never_comes_ends_in_one_line_naming_it(tmp_path, brokers):
    _data(tmp_path)
    spec = write_spec(tmp_path, brokers, timeout_s=12)
    t = time.monotonic()
    r = run_parties(spec, ["alice"], timeout_s=120)[0]
    assert 11 < time.monotonic() - t < 60
    assert r.returncode == 4
    assert "waiting for bob at its broker (job t-001): 10 s of 12 s" in r.stderr
    assert "bob did not appear within 12 s" in r.stderr
    assert "--party bob" in r.stderr and "Traceback" not in r.stderr


def test_late_peer_succeeds(tmp_path, brokers):
    _data(tmp_path)
    spec = write_spec(tmp_path, brokers, protocol="KKRT")
    a = _start(spec, "alice")
    time.sleep(25)
    assert a.poll() is None  # still waiting, not failed
    b = _start(spec, "bob")
    results = [p.communicate(timeout=300) for p in (a, b)]
    assert a.returncode == 0 and b.returncode == 0, results
    assert "waiting for bob at its broker (job t-001): 20 s of 600 s" in results[0][1]
    for me, other in (("alice", "bob"), ("bob", "alice")):
        want = expected_rows(tmp_path / f"data/{me}.csv", tmp_path / f"data/{other}.csv", ["uid"])
        assert_same_rows(read_result(tmp_path / f"out/{me}_psi.csv"), want)


def test_stale_messages_of_a_killed_run_are_not_taken_for_the_peer(tmp_path, brokers):
    _data(tmp_path)
    # An earlier run with another protocol left its HELLO at bob's broker, then died.
    old = _start(_spec_for(tmp_path, brokers, "old", protocol="KKRT"), "alice")
    time.sleep(4)
    os.killpg(old.pid, signal.SIGKILL)
    old.wait()
    time.sleep(0.5)
    assert "hs-alice-bob" in brokers[1].flow_log()  # its message did reach bob's broker
    spec = write_spec(tmp_path, brokers, protocol="RR22")
    reports = run_ok(spec, ["alice", "bob"])
    assert all(r["protocol"] == "RR22" for r in reports)
    want = expected_rows(tmp_path / "data/alice.csv", tmp_path / "data/bob.csv", ["uid"])
    assert_same_rows(read_result(tmp_path / "out/alice_psi.csv"), want)


def test_check_is_a_dry_run_both_parties_can_do(tmp_path, brokers):
    _data(tmp_path)
    spec = write_spec(tmp_path, brokers)
    results = run_parties(spec, ["alice", "bob"], extra_args=["--check"])
    for r in results:
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        assert report["check"] == "ok" and report["peer_versions"]["spu"]
    assert not (tmp_path / "out/alice_psi.csv").exists()
    # The real run right after is not confused by the dry run's messages.
    run_ok(spec, ["alice", "bob"])
    assert (tmp_path / "out/alice_psi.csv").exists()


def test_check_against_a_real_run_is_refused(tmp_path, brokers):
    _data(tmp_path)
    spec = write_spec(tmp_path, brokers)
    a = _start(spec, "alice", "--check")
    b = _start(spec, "bob")
    results = [p.communicate(timeout=120) for p in (a, b)]
    for p, (_out, err) in zip((a, b), results):
        assert p.returncode == 4 and "mode differs" in err


def test_different_spu_versions_are_named(tmp_path):
    (tmp_path / "a.csv").write_text("uid\n1\n")
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(
        "job_id: v1\nkeys: [uid]\nreceiver: alice\nparties:\n"
        "  alice: {broker: '127.0.0.1:1', input: a.csv, output: o.csv}\n"
        "  bob: {broker: '127.0.0.1:2', input: a.csv, output: p.csv}\n"
    )
    spec = load_spec(spec_path)
    from psi_runner.digest import shared_fields

    mine = {"mode": "run", "fields": shared_fields(spec), "versions": versions()}
    theirs = {**mine, "versions": {**mine["versions"], "spu": "0.9.0", "psi-run": "9.0.0"}}
    diffs = _differences(spec, "alice", mine, "bob", theirs)
    assert any(
        d.startswith(f"spu version differs (alice: {versions()['spu']}, bob: 0.9.0)") for d in diffs
    )
    assert any(d.startswith("psi-run version differs") for d in diffs)
    assert _differences(spec, "alice", mine, "bob", dict(mine)) == []
