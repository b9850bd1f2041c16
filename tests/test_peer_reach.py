"""A peer's broker that is away is named at once, though the local broker answers pushes OK.

The outbox takes a push before the peer's broker has it, so the push alone no longer tells a
waiting runner that the peer's broker cannot be reached. The broker says so in ``/health``
(``unreachable``), and the runner's handshake says so within seconds and in its final line.
Real brokers and real psi-run processes; bob's broker is stopped, so its port is closed.
"""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
from conftest import wait_for, write_csv, write_spec

from broker import codes
from harness.localnet import psi_run_command
from psi_runner.broker_client import BrokerClient


def _unreachable(broker) -> dict:
    return broker.health().get("unreachable", {})


@pytest.mark.parametrize("brokers", ["grpc", "http"], indirect=True)
def test_health_names_the_peer_broker_that_does_not_answer_until_it_does(brokers, request):
    alice, bob = brokers
    route = request.node.callspec.params["brokers"]
    port = bob.grpc_port if route == "grpc" else bob.http_port
    bob.stop()
    client = BrokerClient(alice.http)
    assert client.push("r1", "t", "alice", "bob", b"hello").code == codes.OK  # kept, retried
    assert wait_for(lambda: "bob" in _unreachable(alice), 10)
    entry = _unreachable(alice)["bob"]
    assert entry["next_hops"] == {f"127.0.0.1:{port}": "connection refused"}
    assert entry["retrying"] is True and entry["since"] <= entry["last"] <= time.time()
    bob.restart()
    assert BrokerClient(bob.http).pop("r1", "t", "bob", 10).payload == b"hello"
    assert wait_for(lambda: _unreachable(alice) == {}, 10)


def _read_lines(proc: subprocess.Popen, into: list[tuple[float, str]]) -> threading.Thread:
    def read() -> None:
        for line in proc.stderr:
            into.append((time.monotonic(), line.rstrip("\n")))

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_a_runner_says_within_seconds_that_its_peers_broker_is_not_reachable(tmp_path, brokers):
    """bob's broker is down: bob's run stops in its preflight and cannot warn alice. alice's
    run says at once why bob does not come, and its final line says that bob never appeared
    and why; exit code 4 (the peer did not appear)."""
    bob = brokers[1]
    write_csv(tmp_path / "data/alice.csv", {"uid": ["u1", "u2"]})
    write_csv(tmp_path / "data/bob.csv", {"uid": ["u1", "u3"]})
    spec = write_spec(tmp_path, brokers, job_id="reach", timeout_s=12)
    bob.stop()
    bob_run = subprocess.run(
        psi_run_command(spec, "bob"), capture_output=True, text=True, timeout=60
    )
    assert bob_run.returncode == 3
    assert "of party bob does not answer" in bob_run.stderr.splitlines()[-1]

    run = subprocess.Popen(
        psi_run_command(spec, "alice"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[tuple[float, str]] = []
    reader = _read_lines(run, lines)
    assert run.wait(timeout=60) == 4
    reader.join(10)
    hop = f"127.0.0.1:{bob.grpc_port}"
    told = f"bob's broker at {hop} is not reachable from alice's broker (connection refused"
    said = [t for t, line in lines if told in line and "still waiting for bob until" in line]
    ended = lines[-1][0]
    assert said, lines
    # Said while waiting, long before the 12 s wait ran out (and once: it did not change).
    assert ended - said[0] > 6 and len(said) == 1, lines
    last = lines[-1][1]
    assert "job reach: bob did not appear within 12 s: " + told in last, last
    assert "check that bob's broker runs" in last
    assert "Traceback" not in "\n".join(line for _, line in lines)
    log = next((tmp_path / "logs").glob("*-alice-*.log")).read_text(encoding="utf-8")
    assert told in log
    brokers[0].kill()  # a stop would spend its grace period on alice's undeliverable HELLOs
