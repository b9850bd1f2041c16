"""CSV quoting is syntax, not key text: a quoted file whose values are plain goes to SPU as it is
(``PSI_RUN_PLAIN_AS_IS=1``) or, by default, as its parsed keys in key order.

The end-to-end tests run the real SPU PSI on pyarrow-written files (header ``"uid","amount"``,
every text value quoted) through the plain path (CSV output: SPU reads the file itself), the
default in-order path, and the canonical-key path (Parquet output forces it), and check the
results against pandas and against each other; and a pair whose files quote their keys
differently (SPU orders by the key's raw text, so the quoted side must take the canonical path).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from conftest import expected_rows, log_says, make_ids, read_result, run_ok, write_spec

from psi_runner.data import inspect_input
from psi_runner.preflight import PLAIN_AS_IS_ENV


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "in.csv"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("content", "keys_quoted"),
    [
        ('"uid","amount"\n"a1",1\n"a2",2\n', True),  # pyarrow's way: all text quoted
        ('"uid","amount"\na1,"1"\na2,2\n', False),  # a quoted header and other values
        ('uid,note\na1,"x y"\nb,""\n', False),  # an empty non-key value, quoted
        ('uid,note\n"a1","x y"\n"b",z', True),  # no final newline
    ],
)
def test_quoted_plain_values_go_to_spu_as_they_are(
    tmp_path: Path, content: str, keys_quoted: bool
) -> None:
    inp = inspect_input(_write(tmp_path, content), ("uid",))
    assert inp.plain is True
    assert inp.quoted is True
    assert inp.keys_quoted is keys_quoted
    inp.load_keys(("uid",))  # the preflight hashed them; the parsed value has no quotes
    assert inp.table.column("uid").to_pylist()[0] == "a1"


@pytest.mark.parametrize(
    "content",
    [
        '"uid","note"\n"a1","x,y"\n"a2",z\n',  # a comma inside a non-key value
        '"uid","note"\n"a1","two\nlines"\n"a2",z\n',  # a line break inside a value
        '"uid","no""te"\n"a1",1\n',  # a quote inside a column name
        '"uid","a,b"\n"a1",1\n',  # a comma inside a column name
        '"uid"\n"a,1"\n"a2"\n',  # a comma inside a key
        '"uid"\n""\n"a2"\n',  # an empty key (encoded)
        '"uid"\r\n"a1"\r\n',  # CRLF
        '"uid"\n"a1"\na2\n',  # some keys quoted, some not: SPU's order would differ
    ],
)
def test_quotes_around_text_spu_would_mangle_take_the_canonical_path(
    tmp_path: Path, content: str
) -> None:
    assert inspect_input(_write(tmp_path, content), ("uid",)).plain is False


def _arrow_csv(path: Path, uids: list[str], amounts: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"uid": pa.array(uids, pa.string()), "amount": pa.array(amounts)})
    pcsv.write_csv(table, path, pcsv.WriteOptions(quoting_style="needed"))


def _inputs(tmp_path: Path, seed: int) -> int:
    """alice's and bob's pyarrow-written files; the number of shared keys."""
    rng = random.Random(seed)
    shared = [*make_ids(400, "s", rng), "a b", "x!y", "p-q", "z"]  # ' ' and '!' sort below '"'
    a = [*shared, *make_ids(300, "a", rng), "a", "x"]
    b = [*make_ids(250, "b", rng), *shared, "a!", "p"]
    rng.shuffle(a)
    rng.shuffle(b)
    _arrow_csv(tmp_path / "data/alice.csv", a, list(range(len(a))))
    _arrow_csv(tmp_path / "data/bob.csv", b, list(range(len(b))))
    assert (tmp_path / "data/alice.csv").read_text().startswith('"uid","amount"\n"')
    return len(shared)


def _check_against_pandas(tmp_path: Path, results: dict[str, pd.DataFrame]) -> None:
    for p, other in (("alice", "bob"), ("bob", "alice")):
        want = expected_rows(tmp_path / f"data/{p}.csv", tmp_path / f"data/{other}.csv", ["uid"])
        pd.testing.assert_frame_equal(
            results[p].sort_values("uid").reset_index(drop=True),
            want.sort_values("uid").reset_index(drop=True),
        )
    # Aligned row by row across the parties.
    assert results["alice"]["uid"].tolist() == results["bob"]["uid"].tolist()


def _spec_writing(tmp_path: Path, pair, job_id: str, suffix: str) -> Path:
    """The test's spec with each party's output at ``out/<party><suffix>``."""
    spec = write_spec(tmp_path, pair, job_id=job_id)
    text = spec.read_text()
    for p in ("alice", "bob"):
        text = text.replace(f"out/{p}_psi.csv", f"out/{p}{suffix}")
    spec.write_text(text)
    return spec


def test_quoted_file_plain_path_matches_canonical_path_and_pandas(tmp_path: Path, pair) -> None:
    shared = _inputs(tmp_path, 12)

    spec = write_spec(tmp_path, pair, job_id="quoted-plain")
    reports = run_ok(spec, ["alice", "bob"], extra_env={PLAIN_AS_IS_ENV: "1"})
    assert [r["intersection_count"] for r in reports] == [shared] * 2
    assert all(log_says(r, "plain=True") for r in reports)  # no canonical-key rewrite
    plain = {p: read_result(tmp_path / f"out/{p}_psi.csv") for p in ("alice", "bob")}

    # by default the same plain keys go to SPU in key order, read again from the file
    spec = _spec_writing(tmp_path, pair, "quoted-in-order", "_in_order.csv")
    reports = run_ok(spec, ["alice", "bob"])
    assert all(log_says(r, "plain keys go to SPU in key order") for r in reports)
    in_order = {p: read_result(tmp_path / f"out/{p}_in_order.csv") for p in ("alice", "bob")}
    for p in ("alice", "bob"):  # the same file, row for row
        assert (tmp_path / f"out/{p}_in_order.csv").read_bytes() == (
            tmp_path / f"out/{p}_psi.csv"
        ).read_bytes()
    _check_against_pandas(tmp_path, in_order)

    spec = _spec_writing(tmp_path, pair, "quoted-canonical", "_canonical.parquet")
    reports = run_ok(spec, ["alice", "bob"])
    assert all(log_says(r, "plain=False") for r in reports)

    _check_against_pandas(tmp_path, plain)
    canonical = {
        p: pq.read_table(tmp_path / f"out/{p}_canonical.parquet").to_pandas()
        for p in ("alice", "bob")
    }
    _check_against_pandas(tmp_path, canonical)
    for p in ("alice", "bob"):  # the same rows either way
        pd.testing.assert_frame_equal(
            plain[p].sort_values("uid").reset_index(drop=True),
            canonical[p].sort_values("uid").reset_index(drop=True),
        )


def test_keys_quoted_on_one_side_only_still_line_up(tmp_path: Path, pair) -> None:
    shared = _inputs(tmp_path, 13)
    bob = tmp_path / "data/bob.csv"  # bob's keys bare, his header and values still quoted
    table = pcsv.read_csv(
        bob, convert_options=pcsv.ConvertOptions(column_types={"uid": pa.string()})
    )
    with open(bob, "w", encoding="utf-8") as fh:
        fh.write('"uid","amount"\n')
        fh.writelines(
            f'{u},"{x}"\n' for u, x in zip(table["uid"].to_pylist(), table["amount"].to_pylist())
        )
    spec = write_spec(tmp_path, pair, job_id="quoted-one-side")
    reports = run_ok(spec, ["alice", "bob"], extra_env={PLAIN_AS_IS_ENV: "1"})
    assert [r["intersection_count"] for r in reports] == [shared] * 2
    assert log_says(reports[0], "canonical keys: the peer's keys are not quoted alike")
    assert not log_says(reports[1], "canonical keys:")
    _check_against_pandas(
        tmp_path, {p: read_result(tmp_path / f"out/{p}_psi.csv") for p in ("alice", "bob")}
    )
