"""SPU/yacl error text becomes a sentence with a cause and a next step (unit level)."""

from __future__ import annotations

from pathlib import Path

import pytest

from psi_runner.backends.translate import translate_spu_error
from psi_runner.errors import BackendError, PeerError
from psi_runner.spec import parse_spec

SPEC = parse_spec(
    "job_id: j1\nkeys: [uid]\nreceiver: alice\nparties:\n"
    "  alice: {broker: '127.0.0.1:1', input: a.csv, output: o.csv}\n"
    "  bob: {broker: '127.0.0.1:2', input: b.csv, output: p.csv}\n",
    Path("/tmp/job.yaml"),
)


@pytest.mark.parametrize(
    "raw, cls, needle",
    [
        (
            "what: [link.cc:1] connect to mesh failed, failed to setup connection",
            PeerError,
            "check that bob runs the same job",
        ),
        ("[channel.cc:430] Get data timeout, key=x:P2P-1:1->0", PeerError, "bob stopped sending"),
        (
            "Fail to connect to transport service, host=127.0.0.1:1",
            PeerError,
            "parties.alice.broker",
        ),
        ("bind: Address already in use", BackendError, "port is already in use"),
        (
            "filesystem error: cannot create directories: Invalid argument []",
            BackendError,
            "absolute",
        ),
        ("push failed code E0000000618 no route", PeerError, "route_table.json"),
    ],
)
def test_known_spu_errors_get_a_cause_and_a_next_step(raw, cls, needle):
    err = translate_spu_error(RuntimeError(raw), SPEC, "alice", "running the PSI")
    assert isinstance(err, cls)
    assert str(err).startswith("job j1: running the PSI failed")
    assert needle in str(err)


def test_unknown_error_keeps_its_first_line_and_points_at_the_log():
    err = translate_spu_error(
        RuntimeError("strange thing\nstacktrace: #0 ..."), SPEC, "bob", "creating the SPU link"
    )
    assert isinstance(err, BackendError)
    assert "strange thing" in str(err) and "stacktrace" not in str(err)
    assert "log file" in str(err)
