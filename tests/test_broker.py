"""Real psi-broker processes: PTP over HTTP and gRPC, forwarding, lifecycle, refusals."""

from __future__ import annotations

import queue
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from conftest import _hdr, _http, wait_for

from broker import codes
from broker.proto import ptp_pb2, ptp_pb2_grpc
from harness.localnet import BIN, LocalBroker, start_pair
from psi_runner.broker_client import BrokerClient


@pytest.mark.parametrize("brokers", ["grpc", "http"], indirect=True)
def test_http_push_at_alice_is_popped_at_bob(brokers):
    alice, bob = brokers
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    r = _http(alice, "push", _hdr("s1", "alice-bob", "alice", "bob"), payload)
    assert r.code == codes.OK, r.message
    # alice's broker answered once the message was kept in its outbox; it reaches bob's soon.
    assert wait_for(lambda: _http(bob, "peek", _hdr("s1", "alice-bob", "bob")).payload)
    peeked = _http(bob, "peek", _hdr("s1", "alice-bob", "bob"))
    assert peeked.code == codes.OK and peeked.payload == payload
    got = _http(bob, "pop", _hdr("s1", "alice-bob", "bob"), query="?timeout=2")
    assert got.code == codes.OK and got.payload == payload
    empty = _http(bob, "pop", _hdr("s1", "alice-bob", "bob"), query="?timeout=0.2")
    assert empty.code == codes.POP_TIMEOUT and empty.payload == b""


def test_long_poll_pop_returns_when_the_message_arrives(brokers):
    alice, bob = brokers
    proc = subprocess.Popen(
        [
            str(BIN / "python"),
            "-c",
            "import time, urllib.request; time.sleep(0.5); req = urllib.request.Request("
            f"'http://{alice.http}/v1/interconn/chan/push', data=b'late', method='POST', headers="
            "{'x-ptp-session-id': 's2', 'x-ptp-topic': 't', 'x-ptp-source-node-id': 'alice',"
            " 'x-ptp-target-node-id': 'bob'}); urllib.request.urlopen(req, timeout=10).read()",
        ],
    )
    t = time.monotonic()
    got = _http(bob, "pop", _hdr("s2", "t", "bob"), query="?timeout=10")
    waited = time.monotonic() - t
    proc.wait(10)
    assert got.code == codes.OK and got.payload == b"late"
    assert waited < 9  # answered on arrival, not at the timeout


def test_release_drops_a_sessions_queues(brokers):
    alice, bob = brokers
    for i in range(3):
        assert _http(alice, "push", _hdr("s3", f"t{i}", "alice", "bob"), b"x").code == codes.OK
    # alice answers a push once stored and forwards it in the background: release only once
    # bob holds all three, or a late arrival would land after the release
    assert wait_for(
        lambda: all(_http(bob, "peek", _hdr("s3", f"t{i}", "bob")).payload for i in range(3))
    )
    assert _http(bob, "release", {"x-ptp-session-id": "s3"}).code == codes.OK
    for i in range(3):
        got = _http(bob, "pop", _hdr("s3", f"t{i}", "bob"), query="?timeout=0")
        assert got.code == codes.POP_TIMEOUT and got.payload == b""


def test_push_for_an_unrouted_party_says_no_route(brokers):
    alice, _ = brokers
    r = _http(alice, "push", _hdr("s4", "t", "alice", "carol"), b"x")
    assert r.code == codes.ROUTE_NOT_FOUND
    assert "carol" in r.message


def test_bad_headers_are_refused_with_a_reason(brokers):
    alice, _ = brokers
    r = _http(alice, "push", _hdr("../etc", "t", "alice", "bob"), b"x")
    assert r.code == codes.BAD_REQUEST and "x-ptp-session-id" in r.message
    r = _http(
        alice,
        "push",
        {"x-ptp-session-id": "s", "x-ptp-source-node-id": "alice", "x-ptp-target-node-id": "bob"},
        b"x",
    )
    assert r.code == codes.BAD_REQUEST and "x-ptp-topic" in r.message


def test_grpc_client_from_project_proto_pushes_at_alice_and_pops_at_bob(brokers):
    alice, bob = brokers
    md = lambda src, tgt="": tuple(  # noqa: E731
        (k, v)
        for k, v in {
            "x-ptp-session-id": "g1",
            "x-ptp-source-node-id": src,
            "x-ptp-target-node-id": tgt,
        }.items()
        if v
    )
    with grpc.insecure_channel(f"127.0.0.1:{alice.grpc_port}") as ch:
        stub = ptp_pb2_grpc.PrivateTransferTransportStub(ch)
        out = stub.push(
            ptp_pb2.PushInbound(topic="alice-bob", payload=b"hello bob"),
            metadata=md("alice", "bob"),
            timeout=10,
        )
        assert out.code == codes.OK, out.message
    with grpc.insecure_channel(f"127.0.0.1:{bob.grpc_port}") as ch:
        stub = ptp_pb2_grpc.PrivateTransferTransportStub(ch)
        out = stub.pop(
            ptp_pb2.PopInbound(topic="alice-bob", timeout=5000), metadata=md("bob"), timeout=10
        )
        assert out.code == codes.OK and out.payload == b"hello bob"


def test_unknown_source_node_is_refused_on_invoke(brokers):
    _, bob = brokers
    with grpc.insecure_channel(f"127.0.0.1:{bob.grpc_port}") as ch:
        stub = ptp_pb2_grpc.PrivateTransferProtocolStub(ch)
        out = stub.invoke(
            ptp_pb2.Inbound(payload=b"x"),
            metadata=(
                ("x-ptp-session-id", "g2"),
                ("x-ptp-topic", "t"),
                ("x-ptp-source-node-id", "mallory"),
                ("x-ptp-target-node-id", "bob"),
            ),
            timeout=10,
        )
    assert out.code == codes.UNAUTHORIZED
    assert "|REFUSED|" in bob.flow_log()


def test_broker_logs_addresses_and_stops_cleanly_on_sigterm(tmp_path):
    b = LocalBroker("alice", tmp_path / "conf")
    b.write_config({})
    b.start()
    assert b.health()["self_party"] == ["alice"]
    log = (b.conf_dir / "logs" / "broker.log").read_text()
    assert f"listening: http on {b.http}" in log
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(10) == 0
    assert "stopped" in (b.conf_dir / "logs" / "broker.log").read_text()


def _refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def test_sigterm_closes_every_listener_at_once_while_a_call_in_flight_drains(tmp_path):
    """New connections are refused at once, not only after the in-flight calls' grace period."""
    b = LocalBroker("alice", tmp_path / "conf")
    b.write_config({})
    b.start()
    outbox: queue.Queue = queue.Queue()
    meta = {
        "x-ptp-session-id": "sd",
        "x-ptp-topic": "t",
        "x-ptp-source-node-id": "alice",
        "x-ptp-target-node-id": "alice",
    }
    with grpc.insecure_channel(f"127.0.0.1:{b.grpc_port}") as ch:
        replies = ptp_pb2_grpc.PrivateTransferProtocolStub(ch).transport(
            iter(outbox.get, None), timeout=30
        )
        outbox.put(ptp_pb2.Inbound(metadata=meta, payload=b"x"))
        next(replies)  # answered: the stream is open at the broker and stays open
        t = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        while not (_refuses(b.http_port) and _refuses(b.grpc_port)):
            assert time.monotonic() - t < 5, "a listener still accepts after SIGTERM"
            time.sleep(0.01)
        refused_after = time.monotonic() - t
        assert b.proc.poll() is None  # the stream was still draining: the grace had not passed
        outbox.put(None)  # the client ends its stream; the broker has nothing left to wait for
        assert b.proc.wait(15) == 0
    assert refused_after < 1.5  # the grace period is 5 s


def _start_broker_with(conf: Path, properties: str, routes: str, *extra: str):
    """Run psi-broker on a conf folder made of these two texts; it must stop by itself."""
    conf.mkdir()
    (conf / "broker.properties").write_text(properties)
    (conf / "route_table.json").write_text(routes)
    cmd = [str(BIN / "psi-broker"), "--conf-dir", str(conf), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)


def test_broken_config_stops_with_one_line_naming_the_key(tmp_path):
    r = _start_broker_with(
        tmp_path / "conf",
        "grpc.port=abc\nopen.http.server=true\n",
        '{"route_table": {}, "self_party": ["a"]}',
    )
    assert r.returncode == 2
    assert "grpc.port" in r.stderr and "http.port" in r.stderr
    assert "Traceback" not in r.stderr


def test_route_table_that_does_not_parse_stops_start_with_position(tmp_path):
    r = _start_broker_with(
        tmp_path / "conf",
        "grpc.port=0\nopen.http.server=true\nhttp.port=0\n",
        '{"route_table": {,}, "self_party": ["a"]}',
    )
    assert r.returncode == 2
    assert "line 1, column" in r.stderr and "Traceback" not in r.stderr


def test_port_in_use_is_a_clear_error(tmp_path):
    pair = start_pair(tmp_path / "p")
    try:
        r = _start_broker_with(
            tmp_path / "c2",
            f"grpc.port={pair[0].grpc_port}\nbind.host=127.0.0.1\nopen.http.server=true\n"
            "http.port=0\n",
            '{"route_table": {}, "self_party": ["a"]}',
            "--log-dir",
            str(tmp_path / "l"),
        )
        assert r.returncode == 2
        assert "grpc.port" in r.stderr and "in use" in r.stderr
        assert "Traceback" not in r.stderr
    finally:
        for b in pair:
            b.stop()


def test_client_generated_from_the_proto_file_pushes_and_pops(tmp_path, brokers):
    """A fresh client made with protoc from broker/proto/ptp.proto (as an OSX user would)."""
    import importlib
    import sys
    from pathlib import Path

    from grpc_tools import protoc

    proto_dir = Path(__file__).resolve().parent.parent / "broker" / "proto"
    out = tmp_path / "gen"
    out.mkdir()
    assert (
        protoc.main(
            [
                "protoc",
                f"-I{proto_dir}",
                f"--python_out={out}",
                f"--grpc_python_out={out}",
                str(proto_dir / "ptp.proto"),
            ]
        )
        == 0
    )
    sys.path.insert(0, str(out))
    try:
        for name in ("ptp_pb2", "ptp_pb2_grpc"):
            sys.modules.pop(name, None)
        pb = importlib.import_module("ptp_pb2")
        pb_grpc = importlib.import_module("ptp_pb2_grpc")
    finally:
        sys.path.remove(str(out))
    alice, bob = brokers
    with grpc.insecure_channel(f"127.0.0.1:{alice.grpc_port}") as ch:
        out_msg = pb_grpc.PrivateTransferTransportStub(ch).push(
            pb.PushInbound(topic="gen-topic", payload=b"generated"),
            metadata=(
                ("x-ptp-session-id", "gen1"),
                ("x-ptp-source-node-id", "alice"),
                ("x-ptp-target-node-id", "bob"),
            ),
            timeout=10,
        )
        assert out_msg.code == codes.OK, out_msg.message
    with grpc.insecure_channel(f"127.0.0.1:{bob.grpc_port}") as ch:
        got = pb_grpc.PrivateTransferTransportStub(ch).pop(
            pb.PopInbound(topic="gen-topic", timeout=5000),
            metadata=(("x-ptp-session-id", "gen1"), ("x-ptp-source-node-id", "bob")),
            timeout=10,
        )
    assert got.code == codes.OK and got.payload == b"generated"


def test_traffic_of_a_session_counts_its_payload_bytes_until_released(brokers):
    """psi-run's own endpoint, read by a runner's stall detection."""
    alice, bob = brokers
    client = BrokerClient(alice.http)
    assert client.session_traffic("tr-1") == 0
    _http(alice, "push", _hdr("tr-1", "t", "alice", "bob"), b"k" * 68)  # a keep-alive
    out = _http(alice, "push", _hdr("tr-1", "t", "alice", "bob"), b"x" * 1000)
    assert out.code == codes.OK
    assert client.session_traffic("tr-1") == 1000
    assert wait_for(lambda: BrokerClient(bob.http).session_traffic("tr-1") == 1000)
    assert client.session_traffic("tr-other") == 0
    _http(alice, "release", {"x-ptp-session-id": "tr-1"})
    assert client.session_traffic("tr-1") == 0
