"""A link that stops calling its answering broker is noticed; a broker that is away is not
taken for one (``psi_runner.relink``), against a real broker and its pop counts."""

from __future__ import annotations

from psi_runner.broker_client import BrokerClient
from psi_runner.relink import LinkMeter

SESSION = "relink-t.s1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _poll(broker: str, times: int = 1) -> None:
    """What SPU's receiving loop does: a short pop on the session (nothing is queued)."""
    for _ in range(times):
        BrokerClient(broker).pop(SESSION, "bob-alice", "alice", 0.01)


def test_a_link_that_polled_and_went_silent_while_the_broker_answers_is_lost(brokers):
    alice = brokers[0]
    clock = Clock()
    meter = LinkMeter(alice.http, [SESSION], after_s=10, clock=clock)
    meter.sample(broker_answers=True)
    clock.now += 30
    meter.sample(broker_answers=True)
    assert not meter.lost()  # no pop seen yet: SPU's link may not exist yet (a Ray worker)
    _poll(alice.http, 2)
    meter.sample(broker_answers=True)
    for _ in range(4):  # a healthy link: pops between samples
        clock.now += 2
        _poll(alice.http)
        meter.sample(broker_answers=True)
    assert meter.silent_for() == 0
    clock.now += 6
    meter.sample(broker_answers=True)
    assert not meter.lost()
    clock.now += 4
    meter.sample(broker_answers=True)
    assert meter.lost() and meter.silent_for() == 10


def test_silence_counts_only_from_when_a_restarted_broker_answers_again(brokers):
    alice = brokers[0]
    clock = Clock()
    meter = LinkMeter(alice.http, [SESSION], after_s=10, clock=clock)
    _poll(alice.http, 3)
    meter.sample(broker_answers=True)
    alice.kill()
    for _ in range(10):  # away for 20 s: SPU cannot reach it, which is not a lost link
        clock.now += 2
        meter.sample(broker_answers=False)
        assert not meter.lost()
    alice.restart()
    clock.now += 2
    meter.sample(broker_answers=True)  # counts start again at 0 in the new broker
    clock.now += 8
    meter.sample(broker_answers=True)
    assert not meter.lost()
    _poll(alice.http)  # SPU's client reconnected
    clock.now += 4
    meter.sample(broker_answers=True)
    assert not meter.lost()
    clock.now += 10
    meter.sample(broker_answers=True)  # and went silent again
    assert meter.lost()


def test_a_released_session_or_a_broker_without_pop_counts_gives_no_verdict(brokers):
    alice = brokers[0]
    clock = Clock()
    meter = LinkMeter("127.0.0.1:9", [SESSION], after_s=10, clock=clock)  # nothing listens
    for _ in range(20):
        clock.now += 2
        meter.sample(broker_answers=True)
    assert not meter.lost()
    meter = LinkMeter(alice.http, ["relink-t.never-used"], after_s=10, clock=clock)
    for _ in range(20):
        clock.now += 2
        meter.sample(broker_answers=True)
    assert not meter.lost()


def test_the_peer_is_told_whether_to_start_again_or_to_end_too():
    from types import SimpleNamespace

    from psi_runner import notice
    from psi_runner.errors import LinkLost

    spec = SimpleNamespace(job_id="t-001")
    again = notice.failure_notice("alice", "psi", LinkLost("lost"), "n1", "n2")
    told = notice.peer_failed(spec, again)
    assert isinstance(told, LinkLost) and told.restart and told.exit_code == 5
    assert "alice's SPU link did not reconnect" in str(told) and "during psi" in str(told)
    final = notice.failure_notice("alice", "psi", LinkLost("lost", restart=False), "n1", "n2")
    assert "lost" not in final["kind"]  # a notice carries a kind, never the message
    told = notice.peer_failed(spec, final)
    assert isinstance(told, LinkLost) and not told.restart and told.exit_code == 5
    assert "no automatic restart was left" in str(told) and told.from_peer
