"""The OSX feature set on real broker processes: hot routes, relay, auth, queues, flow log."""

from __future__ import annotations

import json
import random
import re
import signal
import time
import urllib.request

import grpc
import pytest
from conftest import (
    _hdr,
    _http,
    assert_same_rows,
    expected_rows,
    read_result,
    run_ok,
    wait_for,
    write_csv,
    write_spec,
)

from broker import codes
from broker.proto import ptp_pb2, ptp_pb2_grpc
from broker.queues import Message, QueueKey, QueueStore
from harness.localnet import LocalBroker, route_to, start_pair

FLOW_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}\|(http|https|grpc|grpcs|-)\|\d+_\d+\|[A-Z_]+\|"
    r"session:[^|]*\|topic:[^|]*\|des:[^|]*\|code:(E\d{10})?\|cost:\d+\|[^|]*\|size:\d+\|msg:.*$"
)


def _psi_data(folder, rows=300, seed=4):
    rng = random.Random(seed)
    ids = [f"id{n:010d}" for n in rng.sample(range(10**10), rows + rows // 2 + rows // 3)]
    shared, only_a, only_b = ids[:rows], ids[rows : rows + rows // 2], ids[rows + rows // 2 :]
    write_csv(folder / "data/alice.csv", {"uid": shared + only_a})
    write_csv(folder / "data/bob.csv", {"uid": only_b + shared})


def _check_psi(folder):
    for me, other in (("alice", "bob"), ("bob", "alice")):
        want = expected_rows(folder / f"data/{me}.csv", folder / f"data/{other}.csv", ["uid"])
        assert_same_rows(read_result(folder / f"out/{me}_psi.csv"), want)


def test_route_edit_takes_effect_and_a_broken_edit_keeps_the_table(tmp_path, brokers):
    alice, bob = brokers
    assert _http(alice, "push", _hdr("r1", "t", "alice", "bob"), b"1").code == codes.OK
    table = alice.conf_dir / "route_table.json"
    good = table.read_text()
    table.write_text(good.replace('"route_table"', '"route_table" ,,'))  # not JSON any more
    assert wait_for(lambda: "rejected" in (alice.conf_dir / "logs/broker.log").read_text())
    log = (alice.conf_dir / "logs/broker.log").read_text()
    assert "line 2, column" in log and str(table) in log
    assert _http(alice, "push", _hdr("r1", "t", "alice", "bob"), b"2").code == codes.OK
    alice.write_routes({})  # a valid edit: bob is no longer routed
    assert wait_for(
        lambda: (
            _http(alice, "push", _hdr("r1", "t", "alice", "bob"), b"3").code
            == codes.ROUTE_NOT_FOUND
        )
    )
    alice.write_routes({"bob": {"default": route_to(bob)}})
    assert wait_for(
        lambda: _http(alice, "push", _hdr("r1", "t", "alice", "bob"), b"4").code == codes.OK
    )


def test_relay_through_a_hub_carries_a_real_psi(tmp_path):
    names = ("alice", "hub", "bob")
    bs = {n: LocalBroker(n, tmp_path / f"broker-{n}") for n in names}
    try:
        for b in bs.values():
            b.write_config({})
            b.start()
        alice, hub, bob = bs["alice"], bs["hub"], bs["bob"]
        # alice and bob know only the hub (as the catch-all); the hub knows both.
        alice.write_routes({"default": {"default": route_to(hub)}})
        bob.write_routes({"default": {"default": route_to(hub, "http")}})
        hub.write_routes(
            {"alice": {"default": route_to(alice)}, "bob": {"default": route_to(bob, "http")}}
        )
        alice.wait_routes(["default"])
        bob.wait_routes(["default"])
        hub.wait_routes(["alice", "bob"])
        _psi_data(tmp_path)
        spec = write_spec(tmp_path, [alice, bob], protocol="KKRT")
        run_ok(spec, ["alice", "bob"])
        _check_psi(tmp_path)
        hub_flow = hub.flow_log()
        assert "|MSG_REDIRECT|" in hub_flow and "des:bob|" in hub_flow and "des:alice|" in hub_flow
        assert "|MSG_DOWNLOAD|" not in hub_flow  # the hub stores nothing: it relays
    finally:
        for b in bs.values():
            b.stop()


def test_token_is_required_when_configured(tmp_path):
    alice, bob = start_pair(tmp_path / "b", properties={"auth.token": "s3cret"})
    try:
        # Routes without the token: the peer refuses, stores nothing, logs it. alice's broker
        # has answered OK already (the message was in its outbox): it gives the message up,
        # logs an ERROR, and answers the next push on that queue with the peer's code.
        assert _http(alice, "push", _hdr("k1", "t", "alice", "bob"), b"x").code == codes.OK
        assert wait_for(lambda: "not delivered, given up" in _log(alice))
        r = _http(alice, "push", _hdr("k1", "t", "alice", "bob"), b"x2")
        assert r.code == codes.UNAUTHORIZED and "token" in r.message, r.message
        assert "not delivered, given up: E0000000403" in _log(alice, "broker-error.log")
        assert f"|MSG_REDIRECT|session:k1|topic:t|des:bob|code:{codes.UNAUTHORIZED}" in (
            alice.flow_log()
        )
        assert (
            _http(bob, "pop", _hdr("k1", "t", "bob"), query="?timeout=0").code == codes.POP_TIMEOUT
        )
        assert "|REFUSED|" in bob.flow_log()
        reloads = _log(alice).count("route table reloaded")
        alice.write_routes({"bob": {"default": [{**route_to(bob)[0], "token": "s3cret"}]}})
        assert wait_for(lambda: _log(alice).count("route table reloaded") > reloads)
        assert _http(alice, "push", _hdr("k2", "t", "alice", "bob"), b"y").code == codes.OK
        got = _http(bob, "pop", _hdr("k2", "t", "bob"), query="?timeout=2")
        assert got.code == codes.OK and got.payload == b"y"
    finally:
        alice.stop()
        bob.stop()


def _log(broker, name: str = "broker.log") -> str:
    path = broker.conf_dir / "logs" / name
    return path.read_text(encoding="utf-8") if path.exists() else ""


def test_idle_queues_expire(tmp_path):
    alice, bob = start_pair(
        tmp_path / "b", properties={"queue.max.free.time": "500", "queue.check.interval": "200"}
    )
    try:
        assert _http(alice, "push", _hdr("e1", "t", "alice", "bob"), b"old").code == codes.OK
        assert wait_for(lambda: "|QUEUE_EXPIRED|" in bob.flow_log(), 5)
        assert (
            _http(bob, "pop", _hdr("e1", "t", "bob"), query="?timeout=0").code == codes.POP_TIMEOUT
        )
    finally:
        alice.stop()
        bob.stop()


def test_pop_without_timeout_waits_consume_msg_waiting_timeout(tmp_path):
    alice, bob = start_pair(tmp_path / "b", properties={"consume.msg.waiting.timeout": "700"})
    try:
        t = time.monotonic()
        assert _http(bob, "pop", _hdr("w1", "t", "bob")).code == codes.POP_TIMEOUT
        assert 0.3 < time.monotonic() - t < 5
    finally:
        alice.stop()
        bob.stop()


def test_oversized_message_is_refused_with_a_clear_code(tmp_path):
    alice, bob = start_pair(tmp_path / "b", properties={"message.max.size": "1000"})
    try:
        r = _http(alice, "push", _hdr("o1", "t", "alice", "bob"), b"x" * 2000)
        assert r.code == codes.TOO_LARGE and "message.max.size" in r.message
    finally:
        alice.stop()
        bob.stop()


def test_full_queue_answers_queue_full_and_never_drops():
    store = QueueStore(max_total_bytes=10, max_session_bytes=6)
    key = QueueKey("s", "bob", "t")
    assert store.push(key, Message(b"abcd", {}))[0] == codes.OK
    assert store.push(key, Message(b"efgh", {}))[0] == codes.QUEUE_FULL  # session cap 6
    assert store.push(QueueKey("s2", "bob", "t"), Message(b"ijklmn", {}))[0] == codes.OK
    assert store.push(QueueKey("s3", "bob", "t"), Message(b"z", {}))[0] == codes.QUEUE_FULL
    assert store.push(key, Message(b"x" * 7, {}))[0] == codes.TOO_LARGE  # can never fit
    assert store.peek(key).payload == b"abcd"


def test_backpressure_under_a_small_memory_cap_psi_still_completes(tmp_path):
    import threading

    cap = 1_500_000
    alice, bob = start_pair(
        tmp_path / "b",
        properties={"queue.max.session.bytes": str(cap), "queue.max.total.bytes": str(cap)},
    )
    try:
        # Another job's unread data fills most of bob's memory: the PSI's pushes to bob are
        # answered "queue full" until that job's queues are released, a few seconds in.
        filler = b"f" * 1_400_000
        assert _http(bob, "push", _hdr("filler", "t", "bob", "bob"), filler).code == codes.OK

        def release_later():
            time.sleep(6)
            _http(bob, "release", {"x-ptp-session-id": "filler"})

        threading.Thread(target=release_later, daemon=True).start()
        _psi_data(tmp_path, rows=20_000, seed=8)
        spec = write_spec(tmp_path, [alice, bob], protocol="RR22")
        run_ok(spec, ["alice", "bob"], timeout_s=300)
        _check_psi(tmp_path)
        assert "code:E0000000700" in alice.flow_log() + bob.flow_log()
    finally:
        alice.stop()
        bob.stop()


def test_grpc_transport_stream_delivers_each_message(brokers):
    alice, _bob = brokers
    meta = {
        "x-ptp-session-id": "st1",
        "x-ptp-topic": "bob-alice",
        "x-ptp-source-node-id": "bob",
        "x-ptp-target-node-id": "alice",
    }
    with grpc.insecure_channel(f"127.0.0.1:{alice.grpc_port}") as ch:
        stub = ptp_pb2_grpc.PrivateTransferProtocolStub(ch)
        replies = list(
            stub.transport(
                iter(
                    [
                        ptp_pb2.Inbound(metadata=meta, payload=b"one"),
                        ptp_pb2.Inbound(metadata=meta, payload=b"two"),
                    ]
                ),
                timeout=10,
            )
        )
    assert [r.code for r in replies] == [codes.OK, codes.OK]
    got = [
        _http(alice, "pop", _hdr("st1", "bob-alice", "alice"), query="?timeout=2").payload
        for _ in range(2)
    ]
    assert got == [b"one", b"two"]


def test_flow_log_lines_parse_and_metrics_count_traffic(tmp_path, brokers):
    alice, _bob = brokers
    _psi_data(tmp_path)
    run_ok(write_spec(tmp_path, brokers), ["alice", "bob"])
    for b in brokers:
        lines = [ln for ln in b.flow_log().splitlines() if ln]
        assert lines
        bad = [ln for ln in lines if not FLOW_LINE.match(ln)]
        assert not bad, bad[:3]
        actions = {ln.split("|")[3] for ln in lines}
        assert {"MSG_REDIRECT", "MSG_DOWNLOAD", "DEFAULT_CONSUME"} <= actions
    with urllib.request.urlopen(f"http://{alice.http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    assert re.search(r'psi_broker_bytes_out_total\{peer="bob"\} [1-9]', text)
    assert re.search(r'psi_broker_messages_in_total\{peer="bob"\} [1-9]', text)
    assert "psi_broker_queue_depth" in text


def test_sigterm_answers_waiting_pops_and_exits_promptly(brokers):
    import threading

    _alice, bob = brokers
    result = {}

    def pop():
        result["r"] = _http(bob, "pop", _hdr("g1", "t", "bob"), query="?timeout=60")

    th = threading.Thread(target=pop)
    th.start()
    time.sleep(0.5)
    t = time.monotonic()
    bob.proc.send_signal(signal.SIGTERM)
    assert bob.proc.wait(15) == 0
    th.join(10)
    assert time.monotonic() - t < 10
    assert result["r"].code == codes.POP_TIMEOUT


@pytest.mark.parametrize(
    "bad", ['{"route_table": {"x": {"default": [{"ip": "h"}]}}, "self_party": ["a"]}']
)
def test_invalid_route_edit_is_logged_with_the_problem(tmp_path, brokers, bad):
    alice, _ = brokers
    (alice.conf_dir / "route_table.json").write_text(bad)
    assert wait_for(
        lambda: "route_table.x.default[0].port" in (alice.conf_dir / "logs/broker.log").read_text()
    )
    assert json.loads(json.dumps(alice.health()))["routes"] == ["bob"]  # previous table in use
