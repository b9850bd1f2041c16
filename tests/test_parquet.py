"""Parquet inputs and outputs: checks by file and row group, and real jobs against pandas."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import TRICKY, make_ids, read_result, run_ok, write_csv, write_spec

from psi_runner import data
from psi_runner.errors import PreflightError
from psi_runner.parquet_io import source_of


def _frame(uids: list[str], seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(uids)
    return pd.DataFrame(
        {
            "score": rng.random(n),
            "uid": uids,
            "count": pd.array(rng.integers(0, 1000, n), dtype="Int64"),
            "seen": pd.to_datetime("2024-01-01") + pd.to_timedelta(rng.integers(0, 10**6, n), "s"),
            "note": [None if i % 7 == 0 else f"n{i}" for i in range(n)],  # NULLs off the key
        }
    )


def _write_parquet(path: Path, frame: pd.DataFrame, row_group_size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path,
                   row_group_size=row_group_size)  # fmt: skip


def _refusal(path: Path, keys=("uid",), allow_duplicates: bool = False) -> str:
    with pytest.raises(PreflightError) as info:
        data.inspect_parquet(path, tuple(keys), allow_duplicates)
    return str(info.value)


def test_null_key_is_refused_naming_the_file_and_row_group(tmp_path):
    frame = _frame([f"u{i}" for i in range(300)], 1)
    frame.loc[150, "uid"] = None
    _write_parquet(tmp_path / "in/part-0.parquet", frame.iloc[:100])
    _write_parquet(tmp_path / "in/part-1.parquet", frame.iloc[100:])
    line = _refusal(tmp_path / "in")
    assert "file part-1.parquet, row group 0: key column 'uid' has 1 NULL value(s)" in line
    assert "first: row 51 of the row group" in line


def test_parquet_inputs_are_checked_like_csv(tmp_path):
    frame = _frame([f"u{i}" for i in range(50)], 2)
    _write_parquet(tmp_path / "a.parquet", frame)
    assert "key column 'id' not found; the columns are: score, uid" in _refusal(
        tmp_path / "a.parquet", keys=["id"]
    )
    assert "key column 'score' has type double" in _refusal(tmp_path / "a.parquet", ["score"])
    dup = pd.concat([frame, frame.iloc[[3]]])
    _write_parquet(tmp_path / "dup.parquet", dup)
    assert "1 duplicate key row(s)" in _refusal(tmp_path / "dup.parquet")
    assert data.inspect_parquet(tmp_path / "dup.parquet", ("uid",), True).rows == 51
    _write_parquet(tmp_path / "mixed/a.parquet", frame)
    _write_parquet(tmp_path / "mixed/b.parquet", frame.drop(columns=["note"]))
    assert "need one schema" in _refusal(tmp_path / "mixed")
    (tmp_path / "bad.parquet").write_bytes(b"uid\nx\n")
    assert "not a readable Parquet file" in _refusal(tmp_path / "bad.parquet")
    pq.write_table(pa.Table.from_pandas(frame).slice(0, 0), tmp_path / "empty.parquet")
    assert "has no rows" in _refusal(tmp_path / "empty.parquet")


def test_rows_are_taken_across_files_and_row_groups_in_the_asked_order(tmp_path):
    frame = _frame([f"u{i}" for i in range(500)], 3)
    for i in range(3):
        _write_parquet(tmp_path / f"in/p{i}.parquet", frame.iloc[i * 200 : (i + 1) * 200], 37)
    source = source_of(tmp_path / "in")
    rows = np.array([499, 0, -1, 250, 250, 17, 399, 400, -1, 36, 37], dtype=np.int64)
    got = source.take(rows).to_pandas()
    for j, r in enumerate(rows):
        if r < 0:
            assert got.iloc[j].isna().all()
        else:
            pd.testing.assert_series_equal(
                got.iloc[j], frame.iloc[r], check_names=False, check_exact=True
            )


def _expected(mine: pd.DataFrame, theirs_keys: pd.Series) -> pd.DataFrame:
    keep = mine[mine["uid"].astype(str).isin(set(theirs_keys.astype(str)))]
    return keep.sort_values("uid").reset_index(drop=True)


def test_parquet_folder_in_parquet_out_and_csv_peer_match_pandas(tmp_path, pair):
    rng = random.Random(21)
    shared = make_ids(300, "s", rng) + TRICKY + [""]  # an empty key is a key like any other
    a = shared + make_ids(200, "a", rng)
    b = make_ids(150, "b", rng) + shared
    rng.shuffle(a)
    rng.shuffle(b)
    alice = _frame(a, 4)
    _write_parquet(tmp_path / "data/alice/part-0.parquet", alice.iloc[:250])
    _write_parquet(tmp_path / "data/alice/part-1.parquet", alice.iloc[250:])
    (tmp_path / "data/alice/_SUCCESS").write_text("")  # as Spark leaves it
    write_csv(tmp_path / "data/bob.csv", {"uid": b, "w": [str(i) for i in range(len(b))]})
    spec = write_spec(tmp_path, pair, job_id="pq-1")
    text = spec.read_text().replace("data/alice.csv", "data/alice")
    spec.write_text(text.replace("out/alice_psi.csv", "out/alice_psi.parquet"))
    reports = run_ok(spec, ["alice", "bob"])
    assert [r["intersection_count"] for r in reports] == [len(shared)] * 2
    got = pq.read_table(tmp_path / "out/alice_psi.parquet")
    assert (
        got.schema.remove_metadata()
        == pq.read_schema(tmp_path / "data/alice/part-0.parquet").remove_metadata()
    )  # column types follow the input's
    want = _expected(alice, pd.Series(b))
    pd.testing.assert_frame_equal(
        got.to_pandas().sort_values("uid").reset_index(drop=True), want, check_exact=True
    )
    bob = read_result(tmp_path / "out/bob_psi.csv")
    bob_in = pd.read_csv(tmp_path / "data/bob.csv", dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(
        bob.sort_values("uid").reset_index(drop=True), _expected(bob_in, pd.Series(a))
    )
    # Aligned row by row, as with CSV.
    assert got["uid"].to_pylist() == bob["uid"].tolist()


def test_integer_keys_match_text_keys_and_an_empty_intersection_gives_typed_empty_files(
    tmp_path, pair
):
    ids = list(range(1000, 1400))
    alice = pd.DataFrame({"uid": np.array(ids, dtype=np.int64), "v": np.arange(400) * 0.5})
    _write_parquet(tmp_path / "data/alice.parquet", alice)
    write_csv(tmp_path / "data/bob.csv", {"uid": [str(i) for i in range(1300, 1600)] + ["01301"]})
    spec = write_spec(tmp_path, pair, job_id="pq-2", protocol="KKRT")
    text = spec.read_text().replace("data/alice.csv", "data/alice.parquet")
    text = text.replace("out/alice_psi.csv", "out/alice_psi.parquet")
    spec.write_text(text.replace("out/bob_psi.csv", "out/bob_psi.parquet"))
    run_ok(spec, ["alice", "bob"])
    got = pq.read_table(tmp_path / "out/alice_psi.parquet").to_pandas()
    want = alice[alice["uid"].between(1300, 1399)].reset_index(drop=True)
    pd.testing.assert_frame_equal(got.sort_values("uid").reset_index(drop=True), want)
    bob = pq.read_table(tmp_path / "out/bob_psi.parquet")
    assert bob.schema.field("uid").type == pa.string()  # a CSV input's columns are text
    assert sorted(bob["uid"].to_pylist()) == [str(i) for i in range(1300, 1400)]

    # No key in common: both files exist, hold no row, and keep their columns and types.
    _write_parquet(tmp_path / "data/alice.parquet", alice.assign(uid=alice["uid"] + 10**6))
    run_ok(spec, ["alice", "bob"])
    empty = pq.read_table(tmp_path / "out/alice_psi.parquet")
    assert empty.num_rows == 0
    assert empty.schema.field("uid").type == pa.int64()
    assert empty.schema.field("v").type == pa.float64()
    assert pq.read_table(tmp_path / "out/bob_psi.parquet").num_rows == 0


def test_left_join_writes_null_rows_into_typed_parquet(tmp_path, pair):
    rng = random.Random(5)
    shared = make_ids(120, "s", rng)
    a_only, b_only = make_ids(80, "a", rng), make_ids(60, "b", rng)
    alice = _frame(shared + a_only, 6)
    _write_parquet(tmp_path / "data/alice.parquet", alice)
    bob = _frame(b_only + shared, 7)
    _write_parquet(tmp_path / "data/bob.parquet", bob)
    spec = write_spec(tmp_path, pair, job_id="pq-3", join="left")
    text = spec.read_text().replace(".csv", ".parquet")
    spec.write_text(text)
    run_ok(spec, ["alice", "bob"])
    ga = pq.read_table(tmp_path / "out/alice_psi.parquet").to_pandas()
    gb = pq.read_table(tmp_path / "out/bob_psi.parquet").to_pandas()
    assert len(ga) == len(gb) == len(alice)  # left: all of alice's rows, NULL rows at bob
    pd.testing.assert_frame_equal(
        ga.sort_values("uid").reset_index(drop=True),
        alice.sort_values("uid").reset_index(drop=True),
    )
    nulls = gb["uid"].isna()
    assert int(nulls.sum()) == len(a_only)
    assert gb[nulls].drop(columns=["uid"]).isna().all().all()
    assert gb["count"].dtype == bob["count"].dtype and gb["seen"].dtype == bob["seen"].dtype
    pd.testing.assert_frame_equal(
        gb[~nulls].sort_values("uid").reset_index(drop=True), _expected(bob, alice["uid"])
    )
    # Row i of both files belongs together: bob's key where he has the row, else alice-only.
    pairs = list(zip(ga["uid"], gb["uid"]))
    assert all(b is None or a == b for a, b in pairs)
    assert {a for a, b in pairs if b is None} == set(a_only)
