"""``shards: K``: K SPU PSIs over a keyed hash of the key, merged into the unsharded result.

Real brokers, real SPU; every result is checked with pandas and, byte for byte, against the
same job run with ``shards: 1``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    TRICKY,
    assert_same_rows,
    expected_rows,
    make_ids,
    read_result,
    run_ok,
    wait_for,
    write_csv,
    write_spec,
)
from test_join import check_join, expected_join

from harness.localnet import LocalRayHead, free_port_block, psi_run_command
from psi_runner.preflight import PLAIN_AS_IS_ENV
from psi_runner.spec import parse_spec

PARTIES = ["alice", "bob"]


def _outputs(folder: Path) -> dict[str, bytes | None]:
    files = {p: folder / f"out/{p}_psi.csv" for p in PARTIES}
    return {p: f.read_bytes() if f.exists() else None for p, f in files.items()}


def _run_with_shards(folder: Path, brokers, k: int, **spec) -> tuple[dict[str, bytes | None], list]:
    (folder / "out").mkdir(exist_ok=True)
    for f in (folder / "out").iterdir():
        f.unlink()
    path = write_spec(folder, brokers, job_id=f"shards-{k}", shards=k, **spec)
    # Shards give SPU a plain file as it is and merge the bytes SPU writes (its header has
    # each name in quotes); unsharded, such a file would go to SPU as its keys in key order
    # and the result would copy the input's own header line. Compare like with like.
    reports = run_ok(path, PARTIES, extra_env={PLAIN_AS_IS_ENV: "1"})
    return _outputs(folder), reports


def _plain_inputs(folder: Path, rng: random.Random, one_column: bool = False) -> None:
    """alice's file goes to SPU as it is; bob's key is not first (canonical keys), or with
    ``one_column`` both files go as they are."""
    shared = [*make_ids(700, "s", rng), "B1", "a1", " x", "!y", "_z", "{", "10", "9", "ab", "ab!"]
    a = shared + make_ids(400, "a", rng)
    b = shared + make_ids(300, "b", rng)
    rng.shuffle(a)
    rng.shuffle(b)
    if one_column:
        write_csv(folder / "data/alice.csv", {"uid": a}, "\n")
        write_csv(folder / "data/bob.csv", {"uid": b}, "\n")
        return
    write_csv(folder / "data/alice.csv", {"uid": a, "x": [f"a{i}" for i in range(len(a))]}, "\n")
    write_csv(folder / "data/bob.csv", {"y": [f"b{i}" for i in range(len(b))], "uid": b}, "\n")


def _tricky_inputs(folder: Path, rng: random.Random) -> None:
    shared = make_ids(500, "s", rng) + TRICKY
    a = shared + make_ids(250, "a", rng)
    b = shared + make_ids(350, "b", rng)
    rng.shuffle(a)
    rng.shuffle(b)
    write_csv(folder / "data/alice.csv", {"uid": a, "x": [f"a{i}" for i in range(len(a))]})
    write_csv(folder / "data/bob.csv", {"y": [f"b{i}" for i in range(len(b))], "uid": b})


@pytest.mark.parametrize(
    "case,spec",
    [
        ("plain", {}),
        ("tricky", {"join": "full", "left_side": "bob"}),
        ("one column", {"join": "difference"}),
        ("tiny", {"join": "full"}),  # empty shards on both sides
        # only bob (the left side) receives: all his rows, no NULL rows for alice's
        ("tricky", {"join": "left", "receiver": "bob", "broadcast_result": False}),
    ],
)
def test_shards_give_the_unsharded_result_byte_for_byte(tmp_path, brokers, case, spec):
    if case == "tricky":
        _tricky_inputs(tmp_path, random.Random(case))
    elif case == "tiny":
        write_csv(tmp_path / "data/alice.csv", {"uid": ["1", "2"], "x": ["a", "b"]}, "\n")
        write_csv(tmp_path / "data/bob.csv", {"uid": ["2", "3 é", "4"]})
    else:
        _plain_inputs(tmp_path, random.Random(case), one_column=case == "one column")
    unsharded, _ = _run_with_shards(tmp_path, brokers, 1, **spec)
    if spec.get("broadcast_result") is False:
        assert unsharded["alice"] is None
        ins = {p: read_result(tmp_path / f"data/{p}.csv") for p in PARTIES}
        want, _ = expected_join(ins["bob"], ins["alice"], "uid", spec["join"], i_am_left=True)
        got = read_result(tmp_path / "out/bob_psi.csv")
        assert_same_rows(got, want)
    elif spec.get("join"):
        check_join(tmp_path, spec["join"], spec.get("left_side", "alice"))
    else:
        for me, other in (("alice", "bob"), ("bob", "alice")):
            got = read_result(tmp_path / f"out/{me}_psi.csv")
            want = expected_rows(
                tmp_path / f"data/{me}.csv", tmp_path / f"data/{other}.csv", ["uid"]
            )
            assert_same_rows(got, want)
    for k in (2, 3):
        sharded, reports = _run_with_shards(tmp_path, brokers, k, **spec)
        assert sharded == unsharded, f"shards: {k} differs from the unsharded result"
        for r in reports:
            parts = r["shards"]
            assert len(parts) == k
            assert sum(p["rows"] for p in parts) == r["original_count"]
            if case != "tiny":
                assert all(p["rows"] > 0 for p in parts)  # the hash spreads the keys


def test_different_shard_counts_are_refused_before_the_link(tmp_path, brokers):
    _plain_inputs(tmp_path, random.Random(1))
    specs = {}
    for party, k in (("alice", 2), ("bob", 3)):
        folder = tmp_path / party
        folder.mkdir()
        (folder / "data").symlink_to(tmp_path / "data")
        specs[party] = write_spec(folder, brokers, job_id="shards-mismatch", shards=k)
    procs = [
        subprocess.Popen(
            psi_run_command(specs[p], p), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for p in PARTIES
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert "shards differs (alice: 2, bob: 3)" in err, err
        assert "Traceback" not in err
    for party in PARTIES:
        log = next((tmp_path / party / "logs").glob("*.log")).read_text(errors="replace")
        assert "shard processes" not in log and "SPU" not in log.split("handshake")[-1]
        assert not (tmp_path / party / "out").exists() or not any(
            (tmp_path / party / "out").iterdir()
        )


def _shard_pids(folder: Path, party: str) -> list[int]:
    for log in (folder / "logs").glob(f"*-{party}-*.log"):
        m = re.search(r"shard processes: \[([\d, ]+)\]", log.read_text(errors="replace"))
        if m:
            return [int(x) for x in m.group(1).split(",")]
    return []


def _log_has(folder: Path, party: str, text: str) -> bool:
    return any(
        text in log.read_text(errors="replace")
        for log in (folder / "logs").glob(f"*-{party}-*.log")
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie has exited: its parent has not reaped it yet
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ")[-1][:1] != "Z"


def test_a_killed_shard_fails_both_sides_within_seconds(tmp_path, brokers):
    rng = random.Random(7)
    shared = make_ids(150_000, "s", rng)
    write_csv(tmp_path / "data/alice.csv", {"uid": shared + make_ids(5000, "a", rng)}, "\n")
    write_csv(tmp_path / "data/bob.csv", {"uid": shared + make_ids(5000, "b", rng)}, "\n")
    spec = write_spec(tmp_path, brokers, job_id="shards-kill", shards=3)
    procs = {
        p: subprocess.Popen(
            psi_run_command(spec, p), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for p in PARTIES
    }
    try:
        for p in PARTIES:
            started = wait_for(
                lambda p=p: len(_shard_pids(tmp_path, p)) == 3 or procs[p].poll() is not None, 90
            )
            assert started and procs[p].poll() is None, procs[p].communicate()
        # SPU's PSI has started in a shard (its links are up)
        assert wait_for(lambda: _log_has(tmp_path, "alice", "[AbstractPsiParty::Init] start"), 60)
        victim = _shard_pids(tmp_path, "alice")[1]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        errs = {}
        for p, proc in procs.items():
            _, errs[p] = proc.communicate(timeout=60)
            assert proc.returncode != 0, p
            assert "Traceback" not in errs[p]
        assert time.monotonic() - killed_at < 20
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    assert "shard 2 of 3" in errs["alice"] and "killed by signal 9" in errs["alice"], errs
    assert "alice" in errs["bob"], errs["bob"]
    assert not (tmp_path / "out/alice_psi.csv").exists()
    assert not (tmp_path / "out/bob_psi.csv").exists()
    pids = _shard_pids(tmp_path, "alice") + _shard_pids(tmp_path, "bob")
    assert wait_for(lambda: not any(_alive(pid) for pid in pids), 10)


@pytest.mark.parametrize(
    "extra,problem",
    [
        ({"shards": 0}, "shards: must be a whole number from 1 (no sharding) to 64, got 0"),
        ({"shards": 65}, "shards: must be a whole number from 1 (no sharding) to 64, got 65"),
        ({"shards": "4"}, "shards: must be a whole number from 1"),
        ({"shards": 2, "api": "psi_csv"}, "shards: needs api: psi"),
        (
            {"shards": 2, "join": "left", "allow_duplicate_keys": True},
            "shards: a sharded join: left needs unique keys",
        ),
    ],
)
def test_bad_shard_settings_are_refused_with_one_line(tmp_path, extra, problem):
    doc = {
        "job_id": "j",
        "keys": ["uid"],
        "receiver": "alice",
        "parties": {
            p: {"broker": "127.0.0.1:1", "input": f"{p}.csv", "output": f"{p}_out.csv"}
            for p in PARTIES
        },
        **extra,
    }
    with pytest.raises(Exception) as info:
        parse_spec(yaml.safe_dump(doc), tmp_path / "job.yaml")
    assert problem in str(info.value)


def test_ray_shards_run_on_every_node_of_the_cluster(tmp_path, brokers):
    """alice's Ray cluster has two nodes (a head and a second raylet on this host): its two
    shards run one on each."""
    rng = random.Random(11)
    shared = make_ids(3000, "s", rng)
    write_csv(tmp_path / "data/alice.csv", {"uid": shared + make_ids(900, "a", rng)}, "\n")
    write_csv(tmp_path / "data/bob.csv", {"uid": shared + make_ids(700, "b", rng)}, "\n")
    heads = {
        p: LocalRayHead(p, Path(f"/tmp/psi-run-test-shards-{p}-{os.getpid()}"), num_cpus=1)
        for p in PARTIES
    }
    second = None
    try:
        for head in heads.values():
            head.start()
        second = _second_node(heads["alice"], tmp_path)
        spec = write_spec(tmp_path, brokers, job_id="shards-ray", backend="ray", shards=2)
        doc = yaml.safe_load(spec.read_text())
        for p, head in heads.items():
            doc["parties"][p]["ray_address"] = head.address
        spec.write_text(yaml.safe_dump(doc))
        reports = {r["party"]: r for r in run_ok(spec, PARTIES)}
    finally:
        if second is not None:
            os.killpg(second.pid, signal.SIGKILL)
            second.wait(10)
        for head in heads.values():
            head.stop()
            shutil.rmtree(head.temp_dir, ignore_errors=True)
    nodes = [s["node"] for s in reports["alice"]["shards"]]
    assert len(set(nodes)) == 2, nodes
    got = read_result(tmp_path / "out/alice_psi.csv")
    want = expected_rows(tmp_path / "data/alice.csv", tmp_path / "data/bob.csv", ["uid"])
    assert_same_rows(got, want)
    assert reports["bob"]["intersection_count"] == len(shared)


def _second_node(head: LocalRayHead, folder: Path) -> subprocess.Popen:
    """A second raylet joining ``head``'s cluster (``ray start --address``), one CPU, on
    ports of its own."""
    from psi_runner.rayhead import split_address

    host, _ = split_address(head.address)
    base = free_port_block()
    log = folder / "ray-node2.log"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        f"--address={head.address}",
        f"--node-ip-address={host}",
        "--num-cpus=1",
        '--resources={"alice": 1000}',
        "--object-store-memory=100000000",
        f"--node-manager-port={base + 1}",
        f"--object-manager-port={base + 2}",
        f"--dashboard-agent-grpc-port={base + 4}",
        f"--dashboard-agent-listen-port={base + 5}",
        f"--metrics-export-port={base + 6}",
        f"--runtime-env-agent-port={base + 7}",
        f"--min-worker-port={base + 100}",
        f"--max-worker-port={base + 199}",
        "--disable-usage-stats",
        "--block",
    ]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    deadline = time.monotonic() + 90
    while b"Ray runtime started" not in log.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(log.read_text(errors="replace")[-2000:])
        time.sleep(0.2)
    return proc
