"""Durable queues: what a broker answered OK for survives its SIGKILL and is delivered after
it starts again; a pop removes a message only once the next pop confirms it."""

from __future__ import annotations

import os
import random
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest
from conftest import (
    ECDH_LINK,
    assert_same_rows,
    expected_rows,
    make_ids,
    read_result,
    run_ok,
    wait_for,
    write_csv,
    write_spec,
)

from broker import codes
from broker.dispatch import DUPLICATE_ENV
from harness.localnet import BIN, LocalBroker, start_pair
from psi_runner.broker_client import BrokerClient


def _client(broker: LocalBroker) -> BrokerClient:
    return BrokerClient(broker.http)


def _push(broker: LocalBroker, session: str, payload: bytes, topic: str = "t") -> str:
    """Push alice -> bob at ``broker``: at alice's it goes through her outbox, at bob's it
    is stored at once (the tests of bob's own store push there)."""
    return _client(broker).push(session, topic, "alice", "bob", payload).code


def _pop(broker: LocalBroker, session: str, topic: str = "t", wait_s: float = 0.5) -> bytes:
    out = _client(broker).pop(session, topic, "bob", wait_s)
    return out.payload if out.code == codes.OK else b""


def _stored(broker: LocalBroker) -> int:
    """Messages in the broker's durable store, not yet confirmed (its /metrics)."""
    with urllib.request.urlopen(f"http://{broker.http}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return int(re.search(r"^psi_broker_store_messages (\d+)$", text, re.M).group(1))


def _segments(broker: LocalBroker) -> list[Path]:
    return sorted((broker.conf_dir / "store" / "log").glob("*.seg"))


def _log(broker: LocalBroker) -> str:
    return (broker.conf_dir / "logs" / "broker.log").read_text(encoding="utf-8")


def test_messages_accepted_before_a_sigkill_are_delivered_after_the_restart(brokers):
    alice, bob = brokers
    payloads = [os.urandom(n) for n in (1, 1000, 300_000)] + [b""]
    for p in payloads:
        assert _push(alice, "s1", p) == codes.OK  # kept by alice's broker, then by bob's
    bob.kill()  # whatever reached bob's broker is on its disk, the rest in alice's outbox
    bob.restart()
    assert [_pop(bob, "s1", wait_s=10) for _ in payloads[:3]] == payloads[:3]
    assert "durable queues in " in _log(bob)


def test_a_popped_message_is_offered_again_until_the_next_pop_confirms_it(brokers):
    _alice, bob = brokers
    for p in (b"one", b"two", b"three"):
        assert _push(bob, "s2", p) == codes.OK
    assert _pop(bob, "s2") == b"one"
    bob.kill()  # "one" was handed out but never confirmed
    bob.restart()
    assert _pop(bob, "s2") == b"one"  # offered again
    assert _pop(bob, "s2") == b"two"  # confirms "one"
    assert _pop(bob, "s2") == b"three"
    bob.kill()
    bob.restart()
    assert _pop(bob, "s2") == b"three"  # the last one is never confirmed by a later pop...
    _client(bob).release("s2", "bob")  # ...but the session's release confirms it
    assert wait_for(lambda: _stored(bob) == 0)
    bob.kill()
    bob.restart()
    assert _pop(bob, "s2", wait_s=0.2) == b""


def test_release_and_expiry_free_the_disk(tmp_path):
    alice, bob = start_pair(
        tmp_path / "b", properties={"queue.max.free.time": "300", "queue.check.interval": "100"}
    )
    try:
        assert _push(bob, "s3", b"x" * 5000) == codes.OK
        assert _stored(bob) == 1
        assert wait_for(lambda: _stored(bob) == 0, timeout_s=5)  # expired unused
        assert "QUEUE_EXPIRED" in bob.flow_log()
    finally:
        alice.stop()
        bob.stop()


def test_a_damaged_store_file_is_reported_and_the_rest_recovered(brokers):
    _alice, bob = brokers
    for p in (b"first", b"second", b"third"):
        assert _push(bob, "s4", p) == codes.OK
    bob.kill()
    (victim,) = _segments(bob)
    data = bytearray(victim.read_bytes())
    second = data.index(b"PSIR", data.index(b"PSIR") + 1)  # where the second record starts
    data[data.index(b"second")] ^= 0xFF  # one flipped bit, as a bad sector leaves it
    victim.write_bytes(data)
    junk = victim.with_name("00000000000000ff.seg")
    junk.write_bytes(b"junk")
    bob.restart()
    assert [_pop(bob, "s4") for _ in range(2)] == [b"first", b"third"]
    log = _log(bob)
    assert f"{victim} is damaged at offset {second} (checksum mismatch)" in log
    assert f"{junk} is damaged at offset 0" in log
    assert sorted(p.name for p in (bob.conf_dir / "store" / "damaged").iterdir()) == sorted(
        [victim.name, junk.name]
    )
    bob.kill()  # the damaged segments are not met again at the next start
    bob.restart()
    assert _log(bob).count("is damaged") == 2
    assert _pop(bob, "s4") == b"third"  # handed out before the kill, never confirmed


def test_messages_in_the_senders_outbox_at_a_sigkill_arrive_after_its_restart(brokers):
    alice, bob = brokers
    bob.stop()  # alice's broker cannot send on: what it answers OK for waits in its outbox
    payloads = [os.urandom(n) for n in (10, 70_000, 1, 2_000_000, 500)]
    for p in payloads:
        assert _push(alice, "s7", p) == codes.OK
    alice.kill()
    bob.restart()
    alice.restart()
    assert "5 to send on" in _log(alice)
    assert [_pop(bob, "s7", wait_s=10) for _ in payloads] == payloads
    assert _pop(bob, "s7", wait_s=0.2) == b""
    assert wait_for(lambda: _stored(alice) == 0)  # sent on: gone from alice's store


@pytest.mark.parametrize("brokers", ["grpc", "http"], indirect=True)
def test_many_messages_pushed_at_once_arrive_in_order_over_either_route(brokers):
    alice, bob = brokers
    rng = random.Random(7)
    payloads = [rng.randbytes(rng.choice((0, 1, 300, 5000, 200_000))) for _ in range(400)]
    client = _client(alice)
    for p in payloads:  # faster than one forward each: the outbox sends several per call
        assert client.push("s8", "t", "alice", "bob", p).code == codes.OK
    got = [_pop(bob, "s8", wait_s=10) for _ in payloads]
    assert got == payloads
    assert "|MSG_REDIRECT|session:s8|" in alice.flow_log()
    assert "does not take batches" not in _log(alice)


@pytest.mark.parametrize("brokers", ["grpc", "http"], indirect=True)
def test_a_peer_without_invoke_batch_gets_one_message_per_call_in_order(brokers, request):
    """bob's broker answers invoke-batch as OSX (or an older psi-broker) does: not found over
    HTTP, UNIMPLEMENTED over gRPC. alice's broker falls back to one invoke per message and
    nothing is lost or reordered."""
    alice, bob = brokers
    bob.stop()  # what alice's broker is given meanwhile waits in its outbox: one batch's worth
    bob.properties["invoke.batch.enabled"] = "false"
    rng = random.Random(11)
    payloads = [rng.randbytes(rng.choice((0, 1, 300, 5000, 200_000))) for _ in range(150)]
    client = _client(alice)
    for p in payloads[:100]:
        assert client.push("s10", "t", "alice", "bob", p).code == codes.OK
    bob.restart()
    for p in payloads[100:]:
        assert client.push("s10", "t", "alice", "bob", p).code == codes.OK
    got = [_pop(bob, "s10", wait_s=10) for _ in payloads]
    assert got == payloads
    assert _pop(bob, "s10", wait_s=0.2) == b""
    answer = {"grpc": "UNIMPLEMENTED", "http": "HTTP 404"}[request.node.callspec.params["brokers"]]
    assert f"does not take batches ({answer}); one message per call" in _log(alice)
    assert bob.flow_log().count("|MSG_DOWNLOAD|session:s10|") == len(payloads)


def test_two_brokers_cannot_share_one_store(brokers, tmp_path):
    alice, _bob = brokers
    other = LocalBroker(
        "carol", tmp_path / "carol", {"queue.store.dir": str(alice.conf_dir / "store")}
    )
    other.write_config({})
    with pytest.raises(RuntimeError, match="in use by another running broker"):
        other.start()


def test_memory_mode_writes_nothing(tmp_path):
    alice, bob = start_pair(tmp_path / "b", properties={"queue.durable": "false"})
    try:
        assert _push(alice, "s5", b"kept in memory") == codes.OK
        assert not (bob.conf_dir / "store").exists()
        assert _pop(bob, "s5") == b"kept in memory"
    finally:
        alice.stop()
        bob.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_answers_queue_full_and_keeps_what_is_stored(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(store)], check=True)
    try:
        alice, bob = start_pair(tmp_path / "b")
        try:
            bob.stop()
            bob.properties["queue.store.dir"] = str(store)
            bob.restart()
            accepted = []
            for n in range(6):
                payload = bytes([n]) * 600_000
                code = _push(bob, "s6", payload)  # bob's own disk answers
                assert code in (codes.OK, codes.QUEUE_FULL)
                if code == codes.OK:
                    accepted.append(payload)
            assert 1 <= len(accepted) < 6
            assert "cannot write a message" in _log(bob)
            bob.kill()
            bob.restart()
            assert [_pop(bob, "s6") for _ in accepted] == accepted
            assert "damaged" not in _log(bob)
        finally:
            alice.stop()
            bob.stop()
    finally:
        subprocess.run(["umount", "-l", str(store)], check=False)


def test_broker_cli_names_an_unusable_store(tmp_path):
    conf = tmp_path / "conf"
    broker = LocalBroker("alice", conf, {"queue.store.dir": "/proc/nope"})
    broker.write_config({})
    out = subprocess.run(
        [str(BIN / "psi-broker"), "--conf-dir", str(conf), "--log-dir", str(tmp_path / "logs")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2
    assert "queue.store.dir /proc/nope: cannot use it" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("protocol", ["RR22", "ECDH"])
def test_every_message_delivered_twice_does_no_harm(tmp_path, monkeypatch, protocol):
    """What a restart may do to the last message of a queue, done to every message: SPU's
    link drops the repeats and psi-run's control channel (hello, heartbeats, result check)
    takes them; the result still matches pandas."""
    monkeypatch.setenv(DUPLICATE_ENV, "1")
    brokers = start_pair(tmp_path / "b")
    try:
        rng = random.Random(11)
        shared = make_ids(20_000, "s", rng)
        write_csv(tmp_path / "data/alice.csv", {"uid": shared + make_ids(9_000, "a", rng)})
        write_csv(tmp_path / "data/bob.csv", {"uid": make_ids(7_000, "b", rng) + shared})
        extra = {"link": ECDH_LINK} if protocol == "ECDH" else {}
        spec = write_spec(tmp_path, brokers, job_id="dup-t", protocol=protocol, **extra)
        run_ok(spec, ["alice", "bob"], stall_retries=1 if protocol == "ECDH" else 0)
        for me, other in (("alice", "bob"), ("bob", "alice")):
            want = expected_rows(
                tmp_path / f"data/{me}.csv", tmp_path / f"data/{other}.csv", ["uid"]
            )
            assert_same_rows(read_result(tmp_path / f"out/{me}_psi.csv"), want)
        assert "delivered twice" in _log(brokers[1])
        logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "logs").glob("job-*"))
        assert "Duplicate seq_id found" in logs  # SPU saw the repeats, and dropped them
    finally:
        for b in brokers:
            b.stop()


def test_messages_of_the_earlier_one_file_per_message_layout_are_taken_over(tmp_path):
    """A store written before the segment log (msgs/<id>.msg) is read at start: nothing
    accepted before an upgrade is lost."""
    import json
    import struct
    import zlib

    from broker.store import MessageStore

    msgs = tmp_path / "store" / "msgs"
    msgs.mkdir(parents=True)
    for msg_id, payload in ((3, b"older"), (7, os.urandom(5000))):
        header = json.dumps({"session": "s", "node": "bob", "topic": "t", "metadata": {}})
        body = header.encode() + payload
        prefix = struct.pack("<4sBIQI", b"PSIQ", 1, len(header), len(payload), zlib.crc32(body))
        (msgs / f"{msg_id:016x}.msg").write_bytes(prefix + body)
    (msgs / "0000000000000009.msg").write_bytes(b"PSIQ")  # cut short
    store = MessageStore(tmp_path / "store")
    store.open()
    got = [(m.id, m.payload) for m in store.recover()]
    store.close()
    assert [i for i, _ in got] == [3, 7] and got[0][1] == b"older"
    assert not msgs.exists() or not any(msgs.iterdir())
    assert (tmp_path / "store" / "damaged" / "0000000000000009.msg").exists()
    store = MessageStore(tmp_path / "store")  # now in the log
    store.open()
    assert [m.id for m in store.recover()] == [3, 7]
    store.close()


def test_a_message_the_peer_never_takes_is_given_up_and_the_next_push_is_told(tmp_path):
    alice, bob = start_pair(tmp_path / "b", properties={"forward.retry.timeout": "500"})
    try:
        bob.stop()  # away for longer than forward.retry.timeout
        assert _push(alice, "s9", b"lost") == codes.OK  # kept in the outbox, retried
        assert wait_for(lambda: "not delivered, given up" in _log(alice))
        refused = _client(alice).push("s9", "t", "alice", "bob", b"next")
        assert refused.code == codes.PEER_UNREACHABLE and "not delivered" in refused.message
        errors = (alice.conf_dir / "logs" / "broker-error.log").read_text(encoding="utf-8")
        assert "session s9" in errors and codes.PEER_UNREACHABLE in errors
        assert f"|MSG_REDIRECT|session:s9|topic:t|des:bob|code:{codes.PEER_UNREACHABLE}" in (
            alice.flow_log()
        )
        assert _stored(alice) == 0  # given up: gone from the store as well
        assert _push(alice, "s9", b"after") == codes.OK  # told once; the queue goes on
    finally:
        alice.stop()
        bob.stop()
