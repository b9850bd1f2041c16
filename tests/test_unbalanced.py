"""Unbalanced PSI (``protocol: ECDH_OPRF_UB``): the server's cache built offline, reused by
online jobs, refused when stale or mismatched.

Real brokers, real SPU; results are checked with pandas.
"""

from __future__ import annotations

import json
import random
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import assert_same_rows, expected_rows, make_ids, read_result, run_ok, write_csv

from harness.localnet import psi_run_command, run_parties
from psi_runner.errors import SpecError
from psi_runner.spec import parse_spec

PARTIES = ["alice", "bob"]


def _spec(folder: Path, brokers, job_id: str, **overrides) -> Path:
    doc = {
        "job_id": job_id,
        "protocol": "ECDH_OPRF_UB",
        "keys": ["uid"],
        "receiver": "alice",
        "unbalanced": {
            "server": "bob",
            "cache": {"alice": str(folder / "cache/alice"), "bob": str(folder / "cache/bob")},
        },
        "parties": {
            b.party: {
                "broker": b.http,
                "input": f"data/{b.party}.csv",
                "output": f"out/{b.party}_psi.csv",
            }
            for b in brokers
        },
        **overrides,
    }
    path = folder / f"{job_id}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def _inputs(folder: Path, seed: int, shared: list[str], big: int = 3000, small: int = 400):
    rng = random.Random(seed)
    a = shared + make_ids(small, "a", rng) + ["  spaced", 'q"uote', "é,comma"]
    b = shared + make_ids(big, "b", rng) + ["  spaced", 'q"uote', "é,comma"]
    rng.shuffle(a)
    rng.shuffle(b)
    write_csv(folder / "data/alice.csv", {"uid": a, "x": [f"a{i}" for i in range(len(a))]})
    write_csv(folder / "data/bob.csv", {"y": [f"b{i}" for i in range(len(b))], "uid": b})


def _offline(spec: Path, party: str = "bob") -> subprocess.CompletedProcess:
    return subprocess.run(
        psi_run_command(spec, party, None, "--offline"),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check(folder: Path, parties: list[str]) -> None:
    for me in parties:
        other = "bob" if me == "alice" else "alice"
        got = read_result(folder / f"out/{me}_psi.csv")
        want = expected_rows(folder / f"data/{me}.csv", folder / f"data/{other}.csv", ["uid"])
        assert_same_rows(got, want)
        assert len(got) > 0


def _private(folder: Path) -> None:
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in folder.rglob("*"):
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {oct(mode)}"


def test_offline_cache_is_reused_by_online_jobs_with_any_client(tmp_path, brokers):
    shared = make_ids(250, "s", random.Random(0))
    _inputs(tmp_path, 1, shared)
    first = _spec(tmp_path, brokers, "ub-1", broadcast_result=True)
    done = _offline(first)
    assert done.returncode == 0, done.stderr
    offline = json.loads(done.stdout)
    assert offline["offline"] == "ok" and offline["cache"]["rows"] == 3253
    _private(tmp_path / "cache/bob")
    manifest = json.loads((tmp_path / "cache/bob/manifest.json").read_text())
    assert manifest["id"] == offline["cache"]["id"]
    assert manifest["fields"]["keys"] == ["uid"] and manifest["curve"] == "CURVE_FOURQ"
    assert manifest["rows"] == 3253 and manifest["spu"]

    # First online job: alice receives her copy of the cache, both get the result.
    reports = run_ok(first, PARTIES)
    _check(tmp_path, PARTIES)
    assert "transfer_s" in reports[0]["seconds"]
    _private(tmp_path / "cache/alice")
    copy = json.loads((tmp_path / "cache/alice/manifest.json").read_text())
    assert copy["id"] == manifest["id"] and copy["server"] == "bob"

    # Another job, another client file, only alice receives: the copy is reused.
    _inputs(tmp_path, 2, shared[:120], big=3000)  # bob's input changes too...
    done = _offline(first)  # ...so bob builds his cache again
    assert done.returncode == 0, done.stderr
    rebuilt = json.loads(done.stdout)["cache"]["id"]
    assert rebuilt != manifest["id"]
    (tmp_path / "out/bob_psi.csv").unlink()
    second = _spec(tmp_path, brokers, "ub-2", broadcast_result=False)
    reports = run_ok(second, PARTIES)
    assert "transfer_s" in reports[0]["seconds"]  # a new cache: a new copy
    assert json.loads((tmp_path / "cache/alice/manifest.json").read_text())["id"] == rebuilt
    _check(tmp_path, ["alice"])
    assert not (tmp_path / "out/bob_psi.csv").exists()
    assert reports[1]["intersection_count"] is None

    rng = random.Random(3)
    a = shared[:50] + make_ids(300, "c", rng)
    write_csv(tmp_path / "data/alice.csv", {"uid": a, "x": ["v"] * len(a)})
    third = _spec(tmp_path, brokers, "ub-3", receiver="bob", broadcast_result=False)
    reports = run_ok(third, PARTIES)
    assert "transfer_s" not in reports[0]["seconds"]  # same cache: the copy is reused
    _check(tmp_path, ["bob"])
    assert reports[1]["intersection_count"] == 50


def _failing(spec: Path) -> list[subprocess.CompletedProcess]:
    results = run_parties(spec, PARTIES, timeout_s=60)
    for r in results:
        assert r.returncode == 3, r.stderr
        assert "Traceback" not in r.stderr
    return results


def test_stale_or_mismatched_cache_is_refused_on_both_sides(tmp_path, brokers):
    _inputs(tmp_path, 4, make_ids(100, "s", random.Random(4)), big=500, small=100)
    spec = _spec(tmp_path, brokers, "ub-refuse")
    results = _failing(spec)  # no cache yet
    for r in results:
        assert "bob has no cache yet" in r.stderr and "--party bob --offline" in r.stderr
    assert _offline(spec).returncode == 0

    with open(tmp_path / "data/bob.csv", "a", encoding="utf-8") as fh:
        fh.write("b-new,added later\r\n")  # the input changed after the cache was built
    for r in _failing(spec):
        assert "bob has a stale cache" in r.stderr and "--party bob --offline" in r.stderr
    assert not (tmp_path / "out/alice_psi.csv").exists()

    assert _offline(spec).returncode == 0
    other_rules = _spec(tmp_path, brokers, "ub-rules", normalize={"uid": ["trim"]})
    for r in _failing(other_rules):
        assert "bob has a cache built for other keys or key rules" in r.stderr

    swapped = _spec(tmp_path, brokers, "ub-swap")
    doc = yaml.safe_load(swapped.read_text())
    doc["unbalanced"]["cache"]["alice"] = str(tmp_path / "alice-points-at-bob")
    (tmp_path / "alice-points-at-bob").mkdir()
    (tmp_path / "alice-points-at-bob/notes.txt").write_text("not a cache")
    swapped.write_text(yaml.safe_dump(doc))
    for r in _failing(swapped):
        assert "alice has a cache folder that holds something else" in r.stderr
    assert (tmp_path / "alice-points-at-bob/notes.txt").exists()

    # The client's offline run, and --offline with a balanced spec, are refused at once.
    r = _offline(spec, "alice")
    assert r.returncode == 3 and "run without --offline" in r.stderr
    balanced = _spec(tmp_path, brokers, "ub-balanced", protocol="RR22")
    doc = yaml.safe_load(balanced.read_text())
    del doc["unbalanced"]
    balanced.write_text(yaml.safe_dump(doc))
    r = _offline(balanced)
    assert r.returncode == 3 and "--offline only applies to protocol ECDH_OPRF_UB" in r.stderr


_BASE = {
    "job_id": "j",
    "protocol": "ECDH_OPRF_UB",
    "keys": ["uid"],
    "receiver": "alice",
    "unbalanced": {"server": "bob", "cache": {"alice": "/c/alice", "bob": "/c/bob"}},
    "parties": {
        "alice": {"broker": "127.0.0.1:1", "input": "/d/a.csv", "output": "/d/a_out.csv"},
        "bob": {"broker": "127.0.0.1:2", "input": "/d/b.csv", "output": "/d/b_out.csv"},
    },
}


def _problems(**changes) -> list[str]:
    doc = json.loads(json.dumps(_BASE))
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    try:
        parse_spec(yaml.safe_dump(doc), Path("/d/job.yaml"))
    except SpecError as exc:
        return exc.problems
    return []


@pytest.mark.parametrize(
    "changes,expected",
    [
        ({}, None),
        ({"unbalanced": None}, "unbalanced: required with protocol ECDH_OPRF_UB"),
        ({"protocol": "RR22"}, "unbalanced: only applies to protocol ECDH_OPRF_UB"),
        ({"backend": "secretflow"}, "backend: protocol ECDH_OPRF_UB runs with backend: embedded"),
        ({"join": "left"}, "join: protocol ECDH_OPRF_UB computes the intersection only"),
        ({"api": "psi_csv"}, "api: protocol ECDH_OPRF_UB needs api: psi"),
        ({"allow_duplicate_keys": True}, "allow_duplicate_keys: protocol ECDH_OPRF_UB needs"),
        ({"shards": 2}, "shards: protocol ECDH_OPRF_UB is not sharded"),
        ({"ecdh_curve": "CURVE_SM2"}, "ecdh_curve: only applies to protocol ECDH"),
        (
            {"unbalanced": {"server": "carol", "cache": {"alice": "/c/a", "bob": "/c/b"}}},
            "unbalanced.server: 'carol' is not one of the parties",
        ),
        (
            {"unbalanced": {"server": "bob", "cache": {"bob": "/c/b"}}},
            "unbalanced.cache.alice: required",
        ),
        (
            {"unbalanced": {"server": "bob", "cache": {"alice": "/c/x", "bob": "/c/x"}}},
            "unbalanced.cache: the two parties need folders of their own",
        ),
        (
            {"unbalanced": {"server": "bob", "cache": {"alice": "/c/a", "bob": "/d"}}},
            "unbalanced.cache.bob: must not be or hold bob's input or output",
        ),
        ({"unbalanced": {"server": "bob"}}, "unbalanced.cache: required"),
        ({"unbalanced": "bob"}, "unbalanced: must be a mapping with server and cache"),
        (
            {"unbalanced": {"server": "bob", "cache": {"alice": "/a", "bob": "/b"}, "x": 1}},
            "unbalanced.x: unknown key",
        ),
    ],
)
def test_bad_unbalanced_specs_are_refused(changes, expected):
    problems = _problems(**changes)
    if expected is None:
        assert problems == []
    else:
        assert any(p.startswith(expected) for p in problems), problems
