"""FATE 2.x's own OSX client against two real psi-broker processes.

The client (tests/fate_osx/fate_client.py, a process of its own, as FATE's is) speaks with
stubs generated here from tests/fate_osx/osx.proto (OSX's package, services and field numbers)
and sends exactly what FATE's ``fate.arch.federation.backends.osx`` sends: a push at its own
broker naming ``x-ptp-from-node-id`` and ``x-ptp-tech-provider-code: FATE``, a pop at the
receiver's broker with a timeout in milliseconds, a release naming only the session. Party ids,
session ids and topics have FATE's shapes (digits, underscores).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _http

from broker import codes
from broker.edge import Refusal
from broker.envelope import Envelope
from harness.localnet import LocalBroker, start_pair

HERE = Path(__file__).parent / "fate_osx"
GUEST, HOST = "9999", "10000"
FATE_DEFAULT_TIMEOUT_MS = 36_000_000  # FATE's federation.osx.timeout


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    """Python stubs generated from the test proto, as FATE generates its own."""
    out = tmp_path_factory.mktemp("fate_stubs")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            "osx.proto",
        ],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def fate_pair(tmp_path_factory):
    """The guest's broker (9999) and the host's (10000), routed to each other."""
    brokers = start_pair(tmp_path_factory.mktemp("fate"), parties=(GUEST, HOST))
    yield brokers
    for b in brokers:
        b.stop()


def fate_session() -> str:
    """A federation session id as FATE-Flow makes one: <job id>_<component>_<task version>."""
    return f"2024{random.randrange(10**17):017d}_psi_0_0"


def topic(session: str, name: str) -> str:
    """The topic FATE's guest 9999 sends ``name`` to host 10000 on (the host receives on it)."""
    return f"{session}-guest-{GUEST}-host-{HOST}-{name}"


def client(stubs: Path, broker: LocalBroker) -> list[str]:
    return [
        sys.executable,
        str(HERE / "fate_client.py"),
        str(stubs),
        f"127.0.0.1:{broker.grpc_port}",
    ]


def fate(stubs: Path, broker: LocalBroker, steps: list[dict], timeout_s: float = 60) -> list:
    """Run FATE's calls ``steps`` against ``broker``; one result per step."""
    proc = subprocess.run(
        client(stubs, broker),
        input=json.dumps(steps),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def push(session: str, name: str, body: bytes, tag: str = "0") -> dict:
    properties = {
        "content_type": "text/plain",
        "app_id": HOST,
        "message_id": name,
        "correlation_id": tag,
    }
    return {
        "op": "push",
        "session": session,
        "src": GUEST,
        "dst": HOST,
        "topic": topic(session, name),
        "properties": properties,
        "body": body.hex(),
    }


def pop(session: str, name: str, timeout_ms: int = FATE_DEFAULT_TIMEOUT_MS) -> dict:
    return {
        "op": "pop",
        "session": session,
        "me": HOST,
        "topic": topic(session, name),
        "timeout_ms": timeout_ms,
    }


def refused_lines(broker: LocalBroker) -> list[str]:
    return [line for line in broker.flow_log().splitlines() if "|REFUSED|" in line]


def test_messages_pushed_at_the_guests_broker_arrive_intact_and_in_order(stubs, fate_pair):
    guest, host = fate_pair
    session = fate_session()
    bodies = [b"", b"x", bytes(range(256)) * 4096, b"last"]  # 1 MiB with every byte value
    answers = fate(
        stubs, guest, [push(session, "en_guest_pk", b, str(i)) for i, b in enumerate(bodies)]
    )
    assert [a["code"] for a in answers] == [codes.OK] * len(bodies), answers

    got = fate(stubs, host, [pop(session, "en_guest_pk") for _ in bodies])
    assert [g["code"] for g in got] == [codes.OK] * len(bodies), got
    assert [bytes.fromhex(g["body"]) for g in got] == bodies
    assert [g["properties"]["correlation_id"] for g in got] == ["0", "1", "2", "3"]
    assert got[0]["properties"]["message_id"] == "en_guest_pk"
    assert f"des:{HOST}" in host.flow_log() and "|MSG_DOWNLOAD|" in host.flow_log()


def test_a_pop_that_finds_nothing_answers_601_when_its_milliseconds_are_up(stubs, fate_pair):
    _guest, host = fate_pair
    [answer] = fate(stubs, host, [pop(fate_session(), "nothing", timeout_ms=1500)])
    assert answer["code"] == codes.POP_TIMEOUT and answer["payload"] == ""
    assert 1.4 <= answer["seconds"] <= 2.5, answer


def test_a_pop_with_fates_default_timeout_waits_for_a_late_message(stubs, fate_pair, tmp_path):
    guest, host = fate_pair
    session = fate_session()
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps([pop(session, "late")]))
    with steps.open() as stdin:
        waiting = subprocess.Popen(
            client(stubs, host), stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
    time.sleep(2)  # the pop is waiting (FATE's 36,000,000 ms is ten hours, not refused)
    assert waiting.poll() is None, waiting.communicate()
    assert fate(stubs, guest, [push(session, "late", b"at last")])[0]["code"] == codes.OK
    out, err = waiting.communicate(timeout=20)
    [answer] = json.loads(out)
    assert answer["code"] == codes.OK, err
    assert bytes.fromhex(answer["body"]) == b"at last"


def test_fates_release_drops_every_queue_of_its_session(stubs, fate_pair):
    guest, host = fate_pair
    session = fate_session()
    before = host.health()["queues"]
    names = ["a_0", "b_0", "c_0"]
    answers = fate(stubs, guest, [push(session, n, n.encode()) for n in names])
    assert {a["code"] for a in answers} == {codes.OK}
    assert host.health()["queues"] == before + len(names)

    [released] = fate(stubs, host, [{"op": "release", "session": session}])
    assert released["code"] == codes.OK, released
    assert host.health()["queues"] == before
    assert "|RELEASE|" in host.flow_log()
    [answer] = fate(stubs, host, [pop(session, "a_0", timeout_ms=200)])
    assert answer["code"] == codes.POP_TIMEOUT


def test_every_refused_push_leaves_a_flow_log_line_with_its_code(stubs, fate_pair):
    guest, _host = fate_pair
    session = fate_session()
    before = len(refused_lines(guest))
    no_session = {
        "op": "raw",
        "method": "push",
        "metadata": [["x-ptp-target-node-id", HOST], ["x-ptp-from-node-id", GUEST]],
        "body": "0a0174",  # PushInbound(topic="t")
    }
    undecodable = {**no_session, "metadata": [["x-ptp-session-id", session]], "body": "ff" * 40}
    unrouted = {**push(session, "n", b"x"), "dst": "8888"}
    answers = fate(stubs, guest, [no_session, undecodable, unrouted])
    assert [a["code"] for a in answers] == [
        codes.BAD_REQUEST,
        codes.BAD_REQUEST,
        codes.ROUTE_NOT_FOUND,
    ], answers
    http = _http(guest, "push", {"x-ptp-session-id": session, "x-ptp-topic": "t"}, b"x")
    assert http.code == codes.BAD_REQUEST and "x-ptp-target-node-id" in http.message

    lines = refused_lines(guest)[before:]
    assert [re.search(r"\|code:(E\d{10})\|", line)[1] for line in lines] == [
        codes.BAD_REQUEST,
        codes.BAD_REQUEST,
        codes.ROUTE_NOT_FOUND,
        codes.BAD_REQUEST,
    ], lines
    assert "x-ptp-session-id is missing" in lines[0] and "127.0.0.1:" in lines[0]
    assert "not a valid PushInbound" in lines[1]
    assert f"session:{session}" in lines[2] and "8888" in lines[2]
    assert lines[3].split("|")[1] == "http" and f"session:{session}|topic:t|" in lines[3]


def test_a_push_that_names_no_source_is_routed_by_its_target(stubs, fate_pair):
    guest, host = fate_pair
    session = fate_session()
    anonymous = {**push(session, "anon", b"who"), "src": None}
    assert fate(stubs, guest, [anonymous])[0]["code"] == codes.OK
    [got] = fate(stubs, host, [pop(session, "anon", timeout_ms=5000)])
    assert got["code"] == codes.OK and bytes.fromhex(got["body"]) == b"who"

    # From the network, a message naming no source is an unknown source: refused (and logged)
    # unless the route table has a 'default' party.
    invoke = _http(
        host,
        "invoke",
        {"x-ptp-session-id": session, "x-ptp-topic": "t", "x-ptp-target-node-id": HOST},
        b"x",
    )
    assert invoke.code == codes.UNAUTHORIZED and "no source node" in invoke.message
    assert f"code:{codes.UNAUTHORIZED}" in refused_lines(host)[-1]


def test_the_standard_source_header_wins_over_fates_alias():
    both = [("x-ptp-from-node-id", "9999"), ("x-ptp-source-node-id", "10000")]
    assert Envelope.parse(both).source_node == "10000"
    assert Envelope.parse(list(reversed(both))).source_node == "10000"
    assert Envelope.parse([("x-ptp-from-node-id", "9999")]).source_node == "9999"
    assert Envelope.parse([("x-ptp-from-inst-id", "org-a")]).source_inst == "org-a"
    with pytest.raises(Refusal):  # the alias meets the same rule
        Envelope.parse([("x-ptp-from-node-id", "../etc")])


def test_a_storm_of_refused_requests_leaves_a_bounded_flow_log(tmp_path):
    broker = LocalBroker("alice", tmp_path / "conf")
    broker.write_config({})
    broker.start()
    started = time.monotonic()
    try:
        for i in range(300):
            _http(broker, "push", {"x-ptp-session-id": f"s{i}", "x-ptp-topic": "t"}, b"x")
    finally:
        windows = int((time.monotonic() - started) // 10) + 1
        broker.stop()  # the count of the last window is written at stop
    lines = refused_lines(broker)
    summaries = [re.search(r"msg:refused (\d+) more", line) for line in lines]
    one_by_one = [line for line, m in zip(lines, summaries) if m is None]
    held = sum(int(m[1]) for m in summaries if m)
    assert len(one_by_one) <= 20 * windows < 300
    assert len(one_by_one) + held == 300  # counted, not lost
    assert all(f"code:{codes.BAD_REQUEST}" in line for line in lines)
