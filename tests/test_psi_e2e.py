"""Two real brokers, two real psi-run processes, real SPU PSI; results checked with pandas."""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest
from conftest import (
    ECDH_LINK,
    TRICKY,
    assert_same_rows,
    expected_rows,
    log_says,
    make_ids,
    read_result,
    run_ok,
    write_csv,
    write_spec,
)

from harness.localnet import start_pair
from psi_runner import agreement


def _single_key_data(
    folder: Path, rng: random.Random, tricky: bool, lineterminator: str = "\r\n"
) -> None:
    shared = make_ids(300, "s", rng) + (TRICKY if tricky else [])
    a = shared + make_ids(400, "a", rng)
    b = shared + make_ids(250, "b", rng)
    if tricky:
        a.append("only-alice 张")
        b.append('only-bob,"x"')
    rng.shuffle(a)
    rng.shuffle(b)
    write_csv(
        folder / "data/alice.csv",
        {"uid": a, "age": [str(i % 90) for i in range(len(a))]},
        lineterminator,
    )
    write_csv(
        folder / "data/bob.csv",
        {"score": [f"{i / 7:.3f}" for i in range(len(b))], "uid": b},
        lineterminator,
    )


def _two_key_data(folder: Path, rng: random.Random) -> None:
    # Pairs that agree on one column only must not match; values hold quotes and commas,
    # which break SPU's own handling of two-column keys.
    shared = [(f"n{i}", c) for i, c in enumerate(["cn", 'q"x', "a,b", "日本", "x"] * 40)]
    a = shared + [(f"n{i}", "alice-only") for i in range(150)] + [("n1", "differs")]
    b = shared + [(f"m{i}", "cn") for i in range(120)] + [("n2", "other")]
    rng.shuffle(a)
    rng.shuffle(b)
    write_csv(
        folder / "data/alice.csv",
        {"id": [x for x, _ in a], "region": [y for _, y in a], "v": ["1"] * len(a)},
    )
    write_csv(folder / "data/bob.csv", {"region": [y for _, y in b], "id": [x for x, _ in b]})


def _stall_guard(protocol: str) -> dict:
    """Spec overrides that turn SPU's rare ECDH stall into a quick, retryable failure."""
    return {"link": ECDH_LINK} if protocol == "ECDH" else {}


def _check(folder: Path, keys: list[str], parties=("alice", "bob")) -> None:
    a, b = parties
    for me, other in ((a, b), (b, a)):
        got = read_result(folder / f"out/{me}_psi.csv")
        want = expected_rows(folder / f"data/{me}.csv", folder / f"data/{other}.csv", keys)
        assert len(want) > 0
        assert_same_rows(got, want)
    # Aligned, as SecretFlow's later steps expect: row i of both files has the same key.
    ra, rb = (read_result(folder / f"out/{p}_psi.csv")[keys] for p in parties)
    pd.testing.assert_frame_equal(ra, rb)


@pytest.mark.parametrize("earlier", ["", "bob"])
def test_awkward_keys_are_checked_as_spu_compared_them_or_decoded_for_an_earlier_peer(
    tmp_path, brokers, earlier
):
    """One key column with commas, quotes and non-ASCII (``escape``-coded for SPU): the result
    check digests the key texts SPU compared at both sides; when one side does not say it can
    (an earlier version, emulated for bob), both decode them back to values first. Either way
    the digests agree (a difference would end both with exit 5) and the result is pandas'."""
    _single_key_data(tmp_path, random.Random(f"forms-{earlier}"), tricky=True)
    spec = write_spec(tmp_path, brokers, protocol="RR22")
    env = {agreement.TEST_NO_FORMS_ENV: earlier} if earlier else {}
    reports = run_ok(spec, ["alice", "bob"], extra_env=env)
    _check(tmp_path, ["uid"])
    said = "decoded from SPU's texts" if earlier else "as SPU compared them"
    for r in reports:
        assert log_says(r, f"the result check digests the keys {said}")


@pytest.mark.parametrize("brokers", ["grpc", "http"], indirect=True)
@pytest.mark.parametrize("protocol", ["ECDH", "KKRT", "RR22"])
def test_single_key_intersection_matches_pandas(tmp_path, brokers, protocol):
    _single_key_data(tmp_path, random.Random(protocol), tricky=True)
    spec = write_spec(tmp_path, brokers, protocol=protocol, **_stall_guard(protocol))
    reports = run_ok(spec, ["alice", "bob"], stall_retries=2 if protocol == "ECDH" else 0)
    _check(tmp_path, ["uid"])
    assert {r["party"] for r in reports} == {"alice", "bob"}
    for r in reports:
        assert r["protocol"] == protocol
        assert r["intersection_count"] == len(read_result(tmp_path / f"out/{r['party']}_psi.csv"))
        assert set(r["seconds"]) >= {"preflight_s", "link_s", "psi_s", "total_s"}


@pytest.mark.parametrize("brokers", ["grpc", "http"], indirect=True)
@pytest.mark.parametrize("protocol", ["ECDH", "KKRT", "RR22"])
def test_two_column_key_with_quotes_and_commas_matches_pandas(tmp_path, brokers, protocol):
    _two_key_data(tmp_path, random.Random(7))
    spec = write_spec(
        tmp_path, brokers, protocol=protocol, keys=["id", "region"], **_stall_guard(protocol)
    )
    run_ok(spec, ["alice", "bob"], stall_retries=2 if protocol == "ECDH" else 0)
    _check(tmp_path, ["id", "region"])


def test_plain_file_goes_to_spu_in_key_order_and_still_matches(tmp_path, brokers):
    _single_key_data(tmp_path, random.Random(1), tricky=False, lineterminator="\n")
    spec = write_spec(tmp_path, brokers, protocol="RR22")
    reports = run_ok(spec, ["alice", "bob"])
    _check(tmp_path, ["uid"])
    # alice's key is her first column and every key is plain: her keys are read again from
    # her file and go to SPU in key order. bob's key is not his first column, and SPU would
    # then sort his output by that column, out of line with alice's: he gives SPU a
    # canonical-key file built from the keys he holds (and _check proves the rows line up).
    by_party = {r["party"]: r for r in reports}
    in_order = "plain keys go to SPU in key order"
    assert log_says(by_party["alice"], in_order)
    assert log_says(by_party["bob"], "plain=False")
    assert not log_says(by_party["bob"], in_order)


def test_numeric_party_names_as_osx_users_write_them(tmp_path):
    pair = start_pair(tmp_path / "brokers", parties=("9999", "10000"))
    try:
        rng = random.Random(3)
        shared = make_ids(100, "s", rng)
        write_csv(tmp_path / "data/9999.csv", {"uid": shared + make_ids(50, "a", rng)})
        write_csv(tmp_path / "data/10000.csv", {"uid": make_ids(70, "b", rng) + shared})
        # Unquoted numbers in YAML, exactly as OSX users name parties.
        spec = tmp_path / "job.yaml"
        spec.write_text(
            "job_id: numeric-1\nprotocol: KKRT\nkeys: [uid]\nreceiver: 9999\nparties:\n"
            f"  9999: {{broker: '{pair[0].http}', input: data/9999.csv, "
            "output: out/9999_psi.csv}\n"
            f"  10000: {{broker: '{pair[1].http}', input: data/10000.csv, "
            "output: out/10000_psi.csv}\n",
            encoding="utf-8",
        )
        run_ok(spec, ["9999", "10000"])
        _check(tmp_path, ["uid"], parties=("9999", "10000"))
    finally:
        for b in pair:
            b.stop()


def test_without_broadcast_only_the_receiver_gets_a_result(tmp_path, brokers):
    _single_key_data(tmp_path, random.Random(5), tricky=False)
    spec = write_spec(tmp_path, brokers, protocol="KKRT", receiver="bob", broadcast_result=False)
    reports = {r["party"]: r for r in run_ok(spec, ["alice", "bob"])}
    got = read_result(tmp_path / "out/bob_psi.csv")
    want = expected_rows(tmp_path / "data/bob.csv", tmp_path / "data/alice.csv", ["uid"])
    assert_same_rows(got, want)
    assert reports["bob"]["intersection_count"] == len(want)
    assert reports["alice"]["intersection_count"] is None
    assert not (tmp_path / "out/alice_psi.csv").exists()


def test_traffic_goes_through_both_brokers_flow_logs(tmp_path, brokers):
    _single_key_data(tmp_path, random.Random(9), tricky=False)
    spec = write_spec(tmp_path, brokers)
    run_ok(spec, ["alice", "bob"])
    for b in brokers:
        flow = b.flow_log()
        assert "|MSG_REDIRECT|" in flow and "|MSG_DOWNLOAD|" in flow
        assert "|DEFAULT_CONSUME|" in flow


@pytest.mark.parametrize("suffix", ["", " é"])  # plain file, and the canonical-key path
def test_empty_intersection_gives_header_only_results(tmp_path, brokers, suffix):
    write_csv(tmp_path / "data/alice.csv", {"uid": ["a" + suffix, "b"], "v": ["1", "2"]})
    write_csv(tmp_path / "data/bob.csv", {"uid": ["c", "d" + suffix], "w": ["x", "y"]})
    spec = write_spec(tmp_path, brokers, protocol="RR22")
    reports = run_ok(spec, ["alice", "bob"])
    assert [r["intersection_count"] for r in reports] == [0, 0]
    for party, cols in (("alice", ["uid", "v"]), ("bob", ["uid", "w"])):
        got = read_result(tmp_path / f"out/{party}_psi.csv")
        assert list(got.columns) == cols and len(got) == 0


@pytest.mark.parametrize("protocol", ["ECDH", "RR22"])
def test_legacy_psi_csv_api_matches_pandas(tmp_path, brokers, protocol):
    """api: psi_csv (SPU's bucket PSI, SecretFlow's SPU.psi_csv) in the embedded backend."""
    _single_key_data(tmp_path, random.Random(f"csv-{protocol}"), tricky=True)
    spec = write_spec(tmp_path, brokers, protocol=protocol, api="psi_csv", **_stall_guard(protocol))
    reports = run_ok(spec, ["alice", "bob"], stall_retries=2 if protocol == "ECDH" else 0)
    _check(tmp_path, ["uid"])
    assert all(r["api"] == "psi_csv" for r in reports)
