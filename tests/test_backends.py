"""``backend: secretflow`` and ``backend: ray``: real SecretFlow production mode, real Ray heads.

Every run goes through two real brokers and is checked against pandas. The Ray heads are
started by the tests (one per party, disjoint port ranges) and stopped through their own
process group, never with ``ray stop``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import (
    TRICKY,
    assert_same_rows,
    expected_rows,
    leftovers,
    make_ids,
    read_result,
    run_ok,
    write_csv,
    write_spec,
)
from test_join import check_join, join_data

from harness.localnet import LocalRayHead, psi_run_command, run_parties

ROOT = Path(__file__).resolve().parent.parent


def _data(folder: Path, rng: random.Random, tricky: bool) -> None:
    shared = make_ids(200, "s", rng) + (TRICKY if tricky else [])
    a = shared + make_ids(150, "a", rng)
    b = shared + make_ids(90, "b", rng)
    rng.shuffle(a)
    rng.shuffle(b)
    term = "\r\n" if tricky else "\n"
    write_csv(folder / "data/alice.csv", {"uid": a, "v": [str(i) for i in range(len(a))]}, term)
    write_csv(folder / "data/bob.csv", {"uid": b, "w": [f"w{i}" for i in range(len(b))]}, term)


def _check(folder: Path, parties=("alice", "bob")) -> None:
    for me in parties:
        other = next(p for p in ("alice", "bob") if p != me)
        want = expected_rows(folder / f"data/{me}.csv", folder / f"data/{other}.csv", ["uid"])
        assert len(want) > 0
        assert_same_rows(read_result(folder / f"out/{me}_psi.csv"), want)


# --- which sockets the runner processes use ---------------------------------------------------


def _tcp_table() -> dict[str, tuple[int, int, str]]:
    """socket inode -> (local port, remote port, state) for IPv4 and IPv6 TCP sockets."""
    table = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name, encoding="ascii") as fh:
            for line in fh.readlines()[1:]:
                f = line.split()
                local, remote, state, inode = f[1], f[2], f[3], f[9]
                table[inode] = (
                    int(local.rsplit(":", 1)[1], 16),
                    int(remote.rsplit(":", 1)[1], 16),
                    state,
                )
    return table


def _runner_pids(spec: Path) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(spec).encode() in cmd and any(c.endswith(b"psi-run") for c in cmd):
            pids.append(int(entry))
    return pids


def _sockets_of(pid: int, table: dict) -> list[tuple[int, int, str]]:
    found = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in table:
            found.append(table[link[8:-1]])
    return found


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class SocketWatch(threading.Thread):
    """Samples the TCP sockets of some processes (by default: the runners of ``spec``)."""

    def __init__(self, spec: Path, pids=None) -> None:
        super().__init__(daemon=True)
        self.spec = spec
        self.pids = pids or (lambda: _runner_pids(spec))
        self.listening: set[int] = set()
        self.remote_ports: set[int] = set()
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            table = _tcp_table()
            # A connection's remote port names a service only when something listens on it;
            # otherwise it is the ephemeral port of a client this process accepted.
            services = {local for local, _, state in table.values() if state == "0A"}
            for pid in self.pids():
                for local, remote, state in _sockets_of(pid, table):
                    if state == "0A":  # LISTEN
                        self.listening.add(local)
                    elif remote in services:
                        self.remote_ports.add(remote)
                self.samples += 1
            time.sleep(0.1)


def test_secretflow_psi_only_talks_to_its_own_broker(tmp_path, brokers):
    """SecretFlow production mode (no Ray), api psi, tricky keys: correct on both sides, and
    the runner processes listen on no port and connect to nothing but their own broker."""
    _data(tmp_path, random.Random(11), tricky=True)
    spec = write_spec(tmp_path, brokers, backend="secretflow", protocol="RR22")
    watch = SocketWatch(spec)
    watch.start()
    try:
        reports = run_ok(spec, ["alice", "bob"])
    finally:
        watch.done.set()
        watch.join()
    _check(tmp_path)
    for r in reports:
        assert r["backend"] == "secretflow" and r["api"] == "psi"
        assert {"sf_init_s", "psi_s", "reveal_s", "shutdown_s"} <= set(r["seconds"])
    assert watch.samples > 10
    assert watch.listening == set(), "SecretFlow or SPU opened a listening port"
    assert watch.remote_ports and watch.remote_ports <= {b.http_port for b in brokers}
    # SecretFlow's own cross-silo messages (sf.reveal) crossed both brokers on their session.
    for b in brokers:
        fed_lines = [ln for ln in b.flow_log().splitlines() if "-fed|" in ln]
        assert any("MSG_REDIRECT" in ln for ln in fed_lines), b.party
        assert any("MSG_DOWNLOAD" in ln or "CONSUME" in ln for ln in fed_lines), b.party


def test_secretflow_psi_csv_legacy_call(tmp_path, brokers):
    """api psi_csv (SecretFlow's legacy bucket PSI) with KKRT; only the receiver gets rows."""
    _data(tmp_path, random.Random(12), tricky=False)
    spec = write_spec(
        tmp_path,
        brokers,
        backend="secretflow",
        api="psi_csv",
        protocol="KKRT",
        receiver="bob",
        broadcast_result=False,
    )
    reports = {r["party"]: r for r in run_ok(spec, ["alice", "bob"])}
    _check(tmp_path, parties=("bob",))
    assert reports["bob"]["intersection_count"] == 200
    assert reports["alice"]["output"] is None
    assert not (tmp_path / "out/alice_psi.csv").exists()
    assert reports["bob"]["api"] == "psi_csv"


def test_secretflow_peer_killed_then_the_job_runs_again(tmp_path, brokers):
    """bob dies during the SecretFlow job: alice ends with a readable line and no output; then
    the same job runs again in the same place (nothing left bound or half-written)."""
    _data(tmp_path, random.Random(13), tricky=False)
    spec = write_spec(tmp_path, brokers, backend="secretflow")
    env = {**os.environ, "PSI_RUN_PEER_SILENCE_S": "8"}
    procs = {
        p: subprocess.Popen(
            psi_run_command(spec, p, tmp_path / "logs"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for p in ("alice", "bob")
    }
    deadline = time.monotonic() + 120
    logs = tmp_path / "logs"
    while time.monotonic() < deadline:  # wait until bob is inside SecretFlow
        if any(
            "PRODUCTION mode" in f.read_text(errors="replace") for f in logs.glob("job-bob-*.log")
        ):
            break
        time.sleep(0.1)
    else:
        pytest.fail("bob never reached sf.init")
    procs["bob"].send_signal(signal.SIGKILL)
    procs["bob"].wait()
    out, err = procs["alice"].communicate(timeout=120)
    assert procs["alice"].returncode == 4, err.decode()
    message = err.decode()
    assert "Traceback" not in message
    assert "bob" in message and "no result was written" in message
    assert out == b""
    assert not (tmp_path / "out/alice_psi.csv").exists()
    assert leftovers(tmp_path / "out", "alice") == []

    run_ok(spec, ["alice", "bob"])  # a daily job can simply run again
    _check(tmp_path)


@pytest.mark.parametrize("backend", ["secretflow", "embedded"])
def test_ctrl_c_during_the_psi_stops_both_sides(tmp_path, brokers, backend):
    """Ctrl-C during the PSI stops this side at once (exit 130) and, through the watchdog,
    the peer. SecretFlow installs a SIGINT handler that lets the job run on; psi-run's job
    process takes SIGINT in its own thread, so that handler never sees it."""
    ids = [f"id{i}" for i in range(300_000)]
    write_csv(tmp_path / "data/alice.csv", {"uid": ids}, "\n")
    write_csv(tmp_path / "data/bob.csv", {"uid": ids[::2]}, "\n")
    spec = write_spec(tmp_path, brokers, backend=backend)
    procs = {
        p: subprocess.Popen(
            psi_run_command(spec, p, tmp_path / "logs"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for p in ("alice", "bob")
    }
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # alice's PSI has started
        if any(
            "Rr22PsiReceiver::Init" in f.read_text(errors="replace")
            for f in (tmp_path / "logs").glob("job-alice-*.log")
        ):
            break
        time.sleep(0.05)
    else:
        pytest.fail("alice's PSI never started")
    t = time.monotonic()
    procs["alice"].send_signal(signal.SIGINT)
    results = {p: (proc.communicate(timeout=120), proc.returncode) for p, proc in procs.items()}
    assert time.monotonic() - t < 15  # at once, not at the 90 s peer-silence limit
    (_, a_err), a_code = results["alice"]
    (_, b_err), b_code = results["bob"]
    assert a_code == 130 and "interrupted; no result was written" in a_err.decode()
    assert b_code == 4 and "alice was interrupted" in b_err.decode()
    assert leftovers(tmp_path / "out") == []


def test_backend_mismatch_is_caught_by_the_handshake(tmp_path, brokers):
    _data(tmp_path, random.Random(14), tricky=False)
    spec = write_spec(tmp_path, brokers)
    other = tmp_path / "job-sf.yaml"
    doc = yaml.safe_load(spec.read_text())
    doc["backend"] = "secretflow"
    doc["parties"] = {
        p: {
            **v,
            "input": str((tmp_path / v["input"]).resolve()),
            "output": str((tmp_path / v["output"]).resolve()),
        }
        for p, v in doc["parties"].items()
    }
    other.write_text(yaml.safe_dump(doc))
    env = dict(os.environ)
    procs = [
        subprocess.Popen(
            psi_run_command(s, p, tmp_path / "logs"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for s, p in ((spec, "alice"), (other, "bob"))
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 4
        assert "backend differs (alice: embedded, bob: secretflow)" in err.decode()


# --- Ray: one head per party, disjoint ports ----------------------------------------------------


@pytest.fixture(scope="module")
def ray_heads():
    heads = []
    try:
        for party in ("alice", "bob"):
            # Ray's socket paths must stay short: a folder right under /tmp, not tmp_path.
            head = LocalRayHead(
                party,
                Path(f"/tmp/psi-run-test-ray-{party}-{os.getpid()}"),
                script=ROOT / "deploy/ray/start-ray-head.sh",
            )  # as deployed
            heads.append(head)
            head.start()
        yield {h.party: h for h in heads}
    finally:
        for h in heads:
            h.stop()
            shutil.rmtree(h.temp_dir, ignore_errors=True)


def _ray_spec(folder: Path, brokers, heads, **overrides) -> Path:
    spec = write_spec(folder, brokers, backend="ray", **overrides)
    doc = yaml.safe_load(spec.read_text())
    for party, head in heads.items():
        doc["parties"][party]["ray_address"] = head.address
    spec.write_text(yaml.safe_dump(doc))
    return spec


def test_ray_heads_use_disjoint_ports(ray_heads):
    from psi_runner.rayhead import ray_start_command

    ports = {}
    for party, head in ray_heads.items():
        cmd = ray_start_command(party, head.address)
        ports[party] = {int(a.split("=")[1]) for a in cmd if a.split("=")[0].endswith("port")}
        assert len(ports[party]) == 11  # GCS, 8 services, the worker range's ends
    assert not ports["alice"] & ports["bob"]


def _head_ports(head: LocalRayHead) -> set[int]:
    from psi_runner.rayhead import SERVICE_PORTS, WORKER_PORTS, split_address

    base = split_address(head.address)[1]
    return (
        {base}
        | {base + off for off in SERVICE_PORTS.values()}
        | set(range(base + WORKER_PORTS[0], base + WORKER_PORTS[1] + 1))
    )


def test_ray_backend_left_join(tmp_path, brokers, ray_heads):
    """SecretFlow on each party's own Ray cluster, api psi, RR22, join left, tricky keys; no
    process of one party's Ray cluster connects to anything of the other party's."""
    join_data(tmp_path, random.Random(21), tricky=True)
    spec = _ray_spec(tmp_path, brokers, ray_heads, join="left")
    watches = {
        p: SocketWatch(spec, pids=lambda h=h: _descendants(h.proc.pid))
        for p, h in ray_heads.items()
    }
    for w in watches.values():
        w.start()
    try:
        reports = run_ok(spec, ["alice", "bob"])
    finally:
        for w in watches.values():
            w.done.set()
            w.join()
    check_join(tmp_path, "left", "alice")
    assert all(r["backend"] == "ray" for r in reports)
    for b in brokers:
        assert "-fed|" in b.flow_log()  # RayFed's messages went through the brokers too
    by_party = {b.party: b for b in brokers}
    for me, other in (("alice", "bob"), ("bob", "alice")):
        seen = watches[me].remote_ports
        # The PSI task ran in this party's Ray worker and used this party's broker ...
        assert by_party[me].http_port in seen, me
        # ... and nothing of the other party: neither its Ray head nor its broker.
        theirs = _head_ports(ray_heads[other]) | {
            by_party[other].http_port,
            by_party[other].grpc_port,
        }
        assert not seen & theirs, (me, seen & theirs)


def test_ray_backend_psi_csv_twice_in_the_same_place(tmp_path, brokers, ray_heads):
    """api psi_csv with KKRT; run twice: the second run finds nothing left over."""
    _data(tmp_path, random.Random(22), tricky=False)
    spec = _ray_spec(tmp_path, brokers, ray_heads, api="psi_csv", protocol="KKRT")
    for _ in range(2):
        reports = run_ok(spec, ["alice", "bob"])
        _check(tmp_path)
        assert [r["intersection_count"] for r in reports] == [200, 200]


def test_ray_head_without_the_party_resource(tmp_path, brokers, ray_heads):
    """alice pointed at bob's head: preflight names the missing resource and the fix."""
    _data(tmp_path, random.Random(23), tricky=False)
    spec = _ray_spec(tmp_path, brokers, {"alice": ray_heads["bob"], "bob": ray_heads["bob"]})
    [result] = run_parties(spec, ["alice"], timeout_s=120, extra_args=["--check"])
    assert result.returncode == 3, result.stderr
    assert "has no 'alice' resource" in result.stderr
    assert "ray start --head" in result.stderr and '{"alice": 1000}' in result.stderr


def test_missing_ray_head_prints_the_ray_start_command(tmp_path, brokers):
    _data(tmp_path, random.Random(24), tricky=False)
    from harness.localnet import free_port_block

    base = free_port_block()
    spec = write_spec(tmp_path, brokers, backend="ray")
    doc = yaml.safe_load(spec.read_text())
    doc["parties"]["alice"]["ray_address"] = f"127.0.0.1:{base}"
    doc["parties"]["bob"]["ray_address"] = f"127.0.0.1:{base + 1000}"
    spec.write_text(yaml.safe_dump(doc))
    [result] = run_parties(spec, ["alice"], timeout_s=60)
    assert result.returncode == 3, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if "Ray head" in ln]
    assert len(lines) == 1
    line = lines[0]
    assert f"the Ray head of alice at 127.0.0.1:{base}" in line and "does not answer" in line
    assert f"--port={base} " in line and f"--node-manager-port={base + 1} " in line
    assert f"--min-worker-port={base + 100} " in line and "--resources=" in line
    assert result.stdout == ""
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("port_of", ["http", "grpc"])
def test_ray_address_of_something_else_is_refused_fast(tmp_path, brokers, port_of):
    """An open port that is not a Ray head (here: the broker's HTTP or gRPC port) is refused
    in seconds, not after ray.init's minutes of retries."""
    _data(tmp_path, random.Random(25), tricky=False)
    spec = write_spec(tmp_path, brokers, backend="ray")
    doc = yaml.safe_load(spec.read_text())
    port = brokers[0].http_port if port_of == "http" else brokers[0].grpc_port
    doc["parties"]["alice"]["ray_address"] = f"127.0.0.1:{port}"
    doc["parties"]["bob"]["ray_address"] = "127.0.0.1:2"
    spec.write_text(yaml.safe_dump(doc))
    t = time.monotonic()
    [result] = run_parties(spec, ["alice"], timeout_s=60, extra_args=["--check"])
    assert time.monotonic() - t < 30
    assert result.returncode == 3, result.stderr
    assert (
        f"127.0.0.1:{port} (parties.alice.ray_address) answers, but not as a Ray head"
        in result.stderr
    )
