"""Preflight and spec refusals through the real CLI, one party at a time.

Every refusal here happens before the handshake: the process must end with the documented
exit code (2 spec invalid, 3 preflight), one stderr line that names the culprit, no traceback,
nothing on stdout and no output file. The brokers are real (one pair for the whole module);
each test uses its own job_id, so a refusal can also be shown to have sent nothing through them
but its one failure notice to the peer (the control session, no data).
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import write_csv, write_spec

from harness.localnet import psi_run_command, run_parties

LOG_LINE = "psi-run: log file "


def _job(
    folder: Path, brokers, job_id: str, alice: bytes | None = b"uid\nu1\nu2\n", **overrides
) -> Path:
    """A spec whose alice input holds ``alice`` (None: no file); bob's input is valid.

    ``timeout_s`` is short so that a regression that lets a bad job through to the handshake
    fails in seconds instead of waiting 10 minutes for a peer that never comes."""
    if alice is not None:
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "data/alice.csv").write_bytes(alice)
    write_csv(folder / "data/bob.csv", {"uid": ["u1", "u3"]})
    return write_spec(folder, brokers, job_id=job_id, timeout_s=10, **overrides)


def _run(spec: Path, party: str = "alice", *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        psi_run_command(spec, party, None, *extra),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _refusal_line(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Check the common promises of a refusal; return its one stderr line."""
    assert r.returncode == code, f"exit {r.returncode}, stderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stdout == "", f"a refused job printed a report: {r.stdout}"
    lines = [
        ln
        for ln in r.stderr.splitlines()
        if not ln.startswith((LOG_LINE, "psi-run: warning:", "psi-run: progress:"))
    ]
    # A spec refusal that does not fit one line lists its problems on indented lines below it.
    while len(lines) > 1 and lines[-1].startswith("  "):
        lines[-2:] = ["\n".join(lines[-2:])]
    assert len(lines) == 1, f"expected one failure line, got: {r.stderr}"
    line = lines[0]
    assert line.startswith("psi-run: ")
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


def _no_output(folder: Path) -> None:
    """No result file, and no leftover work folder, anywhere under the test folder's out/."""
    for party in ("alice", "bob"):
        assert not (folder / f"out/{party}_psi.csv").exists()
    out = folder / "out"
    if out.exists():
        assert list(out.iterdir()) == [], list(out.iterdir())


def _nothing_sent(brokers, job_id: str) -> None:
    """At most the failure notice (one message on the control session), nothing else."""
    for b in brokers:
        lines = [ln for ln in b.flow_log().splitlines() if f"session:{job_id}." in ln]
        assert all(f"session:{job_id}.hs|" in ln for ln in lines), lines
        assert len(lines) <= 1, lines


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- input (exit 3)


def test_input_missing(tmp_path, pair):
    spec = _job(tmp_path, pair, "in-missing", alice=None)
    r = _run(spec)
    _refusal_line(r, 3, str(tmp_path / "data/alice.csv"), "file not found")
    _no_output(tmp_path)
    _nothing_sent(pair, "in-missing")


def test_input_is_a_folder(tmp_path, pair):
    # Tests run as root, where chmod 000 does not stop reading; a folder is unreadable as CSV.
    spec = _job(tmp_path, pair, "in-folder", alice=None)
    (tmp_path / "data/alice.csv").mkdir(parents=True)
    r = _run(spec)
    _refusal_line(r, 3, str(tmp_path / "data/alice.csv"), "is a folder")
    _no_output(tmp_path)
    _nothing_sent(pair, "in-folder")


def test_input_not_utf8_names_the_line(tmp_path, pair):
    spec = _job(tmp_path, pair, "in-utf8", alice=b"uid\n\xff\xfe\n")
    r = _run(spec)
    _refusal_line(r, 3, str(tmp_path / "data/alice.csv"), "not UTF-8", "line 2")
    _no_output(tmp_path)
    _nothing_sent(pair, "in-utf8")


def test_input_without_header_names_the_key_and_lists_the_columns(tmp_path, pair):
    # The first line is data: the "columns" are its values, and 'uid' is not among them.
    spec = _job(tmp_path, pair, "in-nohdr", alice=b"u1,x1\nu2,x2\n")
    r = _run(spec)
    line = _refusal_line(r, 3, str(tmp_path / "data/alice.csv"), "key column 'uid' not found")
    assert line.rstrip().endswith("the columns are: u1, x1"), line
    _no_output(tmp_path)
    _nothing_sent(pair, "in-nohdr")


def test_key_column_missing_lists_the_columns_that_exist(tmp_path, pair):
    spec = _job(tmp_path, pair, "in-nokey", alice=b"id,name\n1,a\n2,b\n")
    r = _run(spec)
    _refusal_line(r, 3, "key column 'uid' not found", "the columns are: id, name")
    _no_output(tmp_path)


def test_blank_line_names_its_number(tmp_path, pair):
    spec = _job(tmp_path, pair, "in-blank", alice=b"uid\nu1\nu2\n\nu3\n")
    r = _run(spec)
    _refusal_line(r, 3, str(tmp_path / "data/alice.csv"), "line 4 is blank")
    _no_output(tmp_path)
    _nothing_sent(pair, "in-blank")


def test_duplicate_keys_are_counted_with_an_example(tmp_path, pair):
    # u1 three times and u2 twice: 3 surplus rows in 2 keys.
    spec = _job(tmp_path, pair, "in-dups", alice=b"uid\nu1\nu2\nu1\nu3\nu2\nu1\n")
    r = _run(spec)
    _refusal_line(
        r,
        3,
        str(tmp_path / "data/alice.csv"),
        "3 duplicate key row(s) in 2 key(s)",
        "e.g. uid='u1'",
        "allow_duplicate_keys: true",
    )
    _no_output(tmp_path)
    _nothing_sent(pair, "in-dups")


# --------------------------------------------------------------------- output, party (exit 3)


def test_output_folder_under_a_file_cannot_be_created(tmp_path, pair):
    spec = _job(tmp_path, pair, "out-file")
    (tmp_path / "afile").write_text("I am a file\n")
    doc = yaml.safe_load(spec.read_text())
    doc["parties"]["alice"]["output"] = "afile/res.csv"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = _run(spec)
    _refusal_line(
        r,
        3,
        f"output {tmp_path / 'afile/res.csv'}",
        "cannot create folder",
        f"{tmp_path / 'afile'} is a file, not a folder",
    )
    assert (tmp_path / "afile").read_text() == "I am a file\n"  # left alone
    _nothing_sent(pair, "out-file")


def test_party_not_in_spec_lists_the_parties(tmp_path, pair):
    spec = _job(tmp_path, pair, "party-x")
    r = _run(spec, "carol")
    _refusal_line(r, 3, "--party 'carol' is not in the spec", "the parties are alice, bob")
    _no_output(tmp_path)
    _nothing_sent(pair, "party-x")


# ------------------------------------------------------------------------- broker (exit 3)


def test_local_broker_unreachable_says_how_to_start_it(tmp_path, pair):
    port = _closed_port()
    spec = _job(tmp_path, pair, "brk-down")
    doc = yaml.safe_load(spec.read_text())
    doc["parties"]["alice"]["broker"] = f"127.0.0.1:{port}"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = _run(spec)
    _refusal_line(
        r,
        3,
        f"broker 127.0.0.1:{port} of party alice does not answer",
        "psi-broker --conf-dir",
        "parties.alice.broker",
    )
    assert not (tmp_path / "out/alice_psi.csv").exists()
    assert list((tmp_path / "out").iterdir()) == []  # the folder may exist (preflight made it)


def test_broker_of_another_party_is_refused_naming_both(tmp_path, pair):
    _alice_broker, bob_broker = pair
    spec = _job(tmp_path, pair, "brk-other")
    doc = yaml.safe_load(spec.read_text())
    doc["parties"]["alice"]["broker"] = bob_broker.http
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = _run(spec)
    _refusal_line(
        r,
        3,
        f"broker {bob_broker.http} serves bob, not alice",
        "parties.alice.broker",
        "self_party",
    )
    _no_output(tmp_path)
    _nothing_sent(pair, "brk-other")


# --------------------------------------------------------------------------- spec (exit 2)


def test_unknown_keys_are_named_by_their_path(tmp_path, pair):
    spec = _job(tmp_path, pair, "spec-unknown", colour="red", link={"recv_timeout": 10})
    doc = yaml.safe_load(spec.read_text())
    doc["parties"]["alice"]["inptu"] = "data/alice.csv"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = _run(spec)
    _refusal_line(
        r,
        2,
        str(spec),
        "3 problems",
        "colour: unknown key",
        "parties.alice.inptu: unknown key",
        "link.recv_timeout: unknown link setting",
    )
    _no_output(tmp_path)
    _nothing_sent(pair, "spec-unknown")


def test_wrong_value_types_are_all_listed_in_one_message(tmp_path, pair):
    spec = _job(
        tmp_path,
        pair,
        "spec-types",
        keys="uid",
        broadcast_result="yes",
        link={"recv_timeout_ms": "10"},
    )
    r = _run(spec)
    _refusal_line(
        r,
        2,
        str(spec),
        "3 problems",
        "keys:",
        "a list of key column names",
        "broadcast_result: must be true or false, got 'yes'",
        "link.recv_timeout_ms: must be a whole number, got '10'",
    )
    _no_output(tmp_path)


def test_invalid_yaml_names_the_line(tmp_path, pair):
    spec = _job(tmp_path, pair, "spec-yaml")
    spec.write_text("job_id: spec-yaml\nkeys: [uid\nreceiver: alice\n")
    r = _run(spec)
    _refusal_line(r, 2, str(spec), "not valid YAML at line 3")
    _no_output(tmp_path)


def test_spec_file_missing(tmp_path):
    spec = tmp_path / "nope.yaml"
    r = _run(spec)
    _refusal_line(r, 2, str(spec), "file not found")
    _no_output(tmp_path)


# ------------------------------------------------------------------- two parties, for real


def test_short_retry_window_warns_but_check_succeeds(tmp_path, brokers):
    write_csv(tmp_path / "data/alice.csv", {"uid": ["u1", "u2"]})
    write_csv(tmp_path / "data/bob.csv", {"uid": ["u2", "u3"]})
    spec = write_spec(tmp_path, brokers, job_id="warn-1", link={"connect_retry_times": 5})
    results = run_parties(spec, ["alice", "bob"], timeout_s=120, extra_args=["--check"])
    for party, r in zip(("alice", "bob"), results):
        assert r.returncode == 0, f"{party}: {r.stderr}"
        assert "Traceback" not in r.stderr
        warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("psi-run: warning:")]
        assert len(warnings) == 1, r.stderr
        assert "connect retry window is 5 s" in warnings[0]
        assert "connect_retry_times x connect_retry_interval_ms" in warnings[0]
        report = json.loads(r.stdout)
        assert report["check"] == "ok" and report["party"] == party
    _no_output(tmp_path)


def _dup_data(kind: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Keys duplicated on one side, on the other, and on both (m x n rows expected)."""
    if kind == "plain":  # handed to SPU unchanged
        k = {"both": "k-both", "both2": "k-both2", "a": "k-a", "b": "k-b", "one": "k-one"}
    else:  # non-plain keys: the canonical (row number) path
        k = {"both": "张三", "both2": 'q"uote,comma', "a": "k-a", "b": "k-b", "one": "k-one"}
    alice = (
        [k["both"]] * 3
        + [k["both2"]] * 2
        + [k["a"]] * 2
        + [k["b"]]
        + [k["one"]]
        + ["a-only-1", "a-only-1", "a-only-2"]
    )
    bob = (
        [k["both"]] * 2
        + [k["both2"]] * 2
        + [k["a"]]
        + [k["b"]] * 3
        + [k["one"]]
        + ["b-only-1", "b-only-1"]
    )
    return (
        {"uid": alice, "a_row": [f"a{i}" for i in range(len(alice))]},
        {"uid": bob, "b_row": [f"b{i}" for i in range(len(bob))]},
    )


@pytest.mark.parametrize("kind", ["plain", "encoded"])
def test_allow_duplicate_keys_gives_each_party_its_side_of_the_inner_join(tmp_path, brokers, kind):
    alice_cols, bob_cols = _dup_data(kind)
    write_csv(tmp_path / "data/alice.csv", alice_cols)
    write_csv(tmp_path / "data/bob.csv", bob_cols)
    spec = write_spec(tmp_path, brokers, job_id=f"dups-{kind}", allow_duplicate_keys=True)
    results = run_parties(spec, ["alice", "bob"], timeout_s=180)
    for party, r in zip(("alice", "bob"), results):
        assert r.returncode == 0, f"{party} failed ({r.returncode}): {r.stderr}"
        assert "Traceback" not in r.stderr
    reports = [json.loads(r.stdout) for r in results]

    def read(path: Path) -> pd.DataFrame:
        return pd.read_csv(path, dtype=str, keep_default_na=False)

    alice_df, bob_df = read(tmp_path / "data/alice.csv"), read(tmp_path / "data/bob.csv")
    keys = ["uid"]
    want = {
        "alice": alice_df.merge(bob_df[keys], on=keys, how="inner"),
        "bob": bob_df.merge(alice_df[keys], on=keys, how="inner"),
    }
    # 3x2 + 2x2 + 2x1 + 1x3 + 1x1 = 16 rows at each party; the one-sided keys drop out.
    assert len(want["alice"]) == len(want["bob"]) == 16
    for report in reports:
        party = report["party"]
        got = read(tmp_path / f"out/{party}_psi.csv")
        cols = list(want[party].columns)
        assert list(got.columns) == cols
        pd.testing.assert_frame_equal(
            got.sort_values(cols).reset_index(drop=True),
            want[party].sort_values(cols).reset_index(drop=True),
        )
        assert report["intersection_count"] == 16
        assert report["original_count"] == len(alice_df if party == "alice" else bob_df)
