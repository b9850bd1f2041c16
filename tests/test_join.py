"""``join: left | right | full | difference`` (SPU PSI v2's advanced joins), checked with pandas.

Each party's output holds its own rows, plus one all-NULL row for every row that only the
other side contributes; row i of alice's file and row i of bob's file belong together.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pytest
from conftest import TRICKY, make_ids, read_result, run_ok, write_csv, write_spec

NULL = "NULL"


def join_data(folder: Path, rng: random.Random, tricky: bool) -> None:
    shared = make_ids(120, "s", rng) + (TRICKY if tricky else [])
    a = shared + make_ids(70, "a", rng)
    b = shared + make_ids(45, "b", rng)
    rng.shuffle(a)
    rng.shuffle(b)
    term = "\r\n" if tricky else "\n"  # tricky: canonical-key path; else SPU reads the file as is
    write_csv(folder / "data/alice.csv", {"uid": a, "x": [f"a{i}" for i in range(len(a))]}, term)
    write_csv(folder / "data/bob.csv", {"y": [f"b{i}" for i in range(len(b))], "uid": b}, term)


def expected_join(
    mine: pd.DataFrame, theirs: pd.DataFrame, key: str, join: str, i_am_left: bool
) -> tuple[pd.DataFrame, int]:
    """(own rows expected in the output, number of all-NULL rows) — computed with pandas."""
    inter = mine[key].isin(theirs[key])
    their_only = int((~theirs[key].isin(mine[key])).sum())
    keep_all_mine = {"left": i_am_left, "right": not i_am_left, "full": True, "difference": False}[
        join
    ]
    pad_theirs = {"left": not i_am_left, "right": i_am_left, "full": True, "difference": True}[join]
    rows = mine[~inter] if join == "difference" else (mine if keep_all_mine else mine[inter])
    return rows, (their_only if pad_theirs else 0)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def check_join(folder: Path, join: str, left: str) -> None:
    outs = {p: read_result(folder / f"out/{p}_psi.csv") for p in ("alice", "bob")}
    ins = {
        p: pd.read_csv(folder / f"data/{p}.csv", dtype=str, keep_default_na=False)
        for p in ("alice", "bob")
    }
    nulls = {}
    for me, other in (("alice", "bob"), ("bob", "alice")):
        got = outs[me]
        assert list(got.columns) == list(ins[me].columns)
        is_null = (got == NULL).all(axis=1)
        want, want_nulls = expected_join(ins[me], ins[other], "uid", join, me == left)
        assert int(is_null.sum()) == want_nulls, me
        pd.testing.assert_frame_equal(_sorted(got[~is_null]), _sorted(want))
        nulls[me] = is_null
    # Aligned: row i of both files is the same key, or exactly one side is a NULL row.
    a, b = outs["alice"], outs["bob"]
    assert len(a) == len(b)
    both = ~nulls["alice"] & ~nulls["bob"]
    assert (a["uid"][both] == b["uid"][both]).all()
    assert not (nulls["alice"] & nulls["bob"]).any()


@pytest.mark.parametrize(
    "join,left_side,tricky",
    [
        ("left", None, True),  # left side defaults to the receiver (alice)
        ("right", None, False),
        ("full", "bob", True),
        ("difference", None, False),
    ],
)
def test_join_types_match_pandas(tmp_path, brokers, join, left_side, tricky):
    join_data(tmp_path, random.Random(join), tricky)
    extra = {"left_side": left_side} if left_side else {}
    spec = write_spec(tmp_path, brokers, join=join, **extra)
    reports = run_ok(spec, ["alice", "bob"])
    check_join(tmp_path, join, left_side or "alice")
    for r in reports:
        assert r["join"] == join
        assert r["intersection_count"] == 120 + (len(TRICKY) if tricky else 0)
        assert r["output_rows"] == len(read_result(tmp_path / f"out/{r['party']}_psi.csv"))


def test_full_join_of_disjoint_inputs(tmp_path, brokers):
    write_csv(tmp_path / "data/alice.csv", {"uid": ["1", "2 é"], "x": ["a", "b"]})
    write_csv(tmp_path / "data/bob.csv", {"uid": ["3", "4", "5"], "y": ["c", "d", "e"]})
    spec = write_spec(tmp_path, brokers, join="full")
    reports = run_ok(spec, ["alice", "bob"])
    assert [r["intersection_count"] for r in reports] == [0, 0]
    check_join(tmp_path, "full", "alice")
    assert len(read_result(tmp_path / "out/alice_psi.csv")) == 5


@pytest.mark.parametrize("join", ["full", "difference"])
def test_join_without_broadcast_only_the_receiver_gets_rows(tmp_path, brokers, join):
    """Without broadcast only the receiver gets a file: its own rows as the join says, and
    (SPU's behaviour) no NULL rows for the sender's unmatched keys."""
    join_data(tmp_path, random.Random(5), tricky=True)
    spec = write_spec(tmp_path, brokers, join=join, receiver="bob", broadcast_result=False)
    reports = {r["party"]: r for r in run_ok(spec, ["alice", "bob"])}
    assert reports["alice"]["output"] is None and not (tmp_path / "out/alice_psi.csv").exists()
    got = read_result(tmp_path / "out/bob_psi.csv")
    ins = {
        p: pd.read_csv(tmp_path / f"data/{p}.csv", dtype=str, keep_default_na=False)
        for p in ("alice", "bob")
    }
    want, _ = expected_join(ins["bob"], ins["alice"], "uid", join, i_am_left=True)
    assert not (got == NULL).all(axis=1).any()
    pd.testing.assert_frame_equal(_sorted(got), _sorted(want))
    assert reports["bob"]["output_rows"] == len(want)
