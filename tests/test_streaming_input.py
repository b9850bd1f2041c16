"""The streaming input path (issue 12): what one pass over the bytes learns, the hashed
duplicate check and the rows read again for the result agree with whole-file computations
(pandas, Python's own bytes methods), at every chunk size and on generated inputs."""

from __future__ import annotations

import os
import random
import threading

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psi_runner import checkpoint, distinct
from psi_runner import data as data_mod
from psi_runner.csv_io import CsvSource
from psi_runner.data import canonical_keys, inspect_input, result_table
from psi_runner.errors import OutputError, PreflightError
from psi_runner.textfacts import BOM, TextFacts

alphabet = st.sampled_from([b"a", b"1", b",", b"\n", b"\r", b'"', b"~", b" ", b"\xc3\xa9"])
texts = st.lists(alphabet, max_size=40).map(b"".join)


def whole_file_facts(raw: bytes) -> dict:
    """The same facts, computed on the whole file at once."""
    bom = raw.startswith(BOM)
    body = raw[3:] if bom else raw
    nl = body.find(b"\n")
    blank = 0
    if body.startswith((b"\n", b"\r\n")):
        blank = 1
    else:
        for needle in (b"\n\n", b"\n\r\n"):
            pos = body.find(needle)
            if pos >= 0 and pos + len(needle) < len(body):
                blank = body.count(b"\n", 0, pos) + 2
                break
    plain = set(range(0x20, 0x7F)) - set(b'"~') | {0x0A}
    arr = np.frombuffer(body, np.uint8)
    starts = np.flatnonzero(arr[:-1] == 0x0A) + 1
    return {
        "bom": bom,
        "header": body[: nl if nl >= 0 else len(body)],
        "header_ends": nl >= 0,
        "empty": not body.strip(),
        "blank_line": blank,
        "has_cr": b"\r" in body,
        "has_quote": b'"' in body,
        "plain_bytes": set(body) <= plain,
        "plain_or_quote": set(body) <= plain | {0x22},
        "data_lines": len(starts),
        "quoted_starts": int(np.count_nonzero(arr[starts] == 0x22)),
    }


@settings(max_examples=300, deadline=None)
@given(head=st.sampled_from([b"", BOM, BOM[:2], b"uid\n"]), raw=texts, chunk=st.integers(1, 9))
def test_text_facts_agree_with_a_whole_file_computation_at_every_chunk_size(head, raw, chunk):
    raw = head + raw
    facts = TextFacts()
    for i in range(0, len(raw), chunk):
        facts.feed(raw[i : i + chunk])
    facts.finish()
    got = {k: getattr(facts, k) for k in whole_file_facts(raw)}
    assert got == whole_file_facts(raw)


def test_duplicate_check_agrees_with_pandas_on_many_shapes() -> None:
    rng = random.Random(7)
    for round_ in range(40):
        width = rng.choice([None, 6, 8, 11, 16, 17])  # None: mixed lengths
        values = list(
            {
                "".join(rng.choice('ab张,"') for _ in range(width or rng.randrange(0, 30)))
                for _ in range(2000)
            }
        )
        if round_ % 2:
            values.insert(rng.randrange(len(values)), rng.choice(values))
        arr = pa.array(values, pa.large_string() if round_ % 3 else pa.string())
        chunked = pa.chunked_array([arr.slice(0, 700), arr.slice(700)])  # offset slices
        want = not pd.Series(values).duplicated().any()
        assert distinct.all_distinct(chunked) is want, (round_, width)


def test_a_hash_collision_falls_back_to_the_exact_check(monkeypatch) -> None:
    monkeypatch.setattr(distinct, "value_hashes", lambda arr: np.zeros(len(arr), np.uint64))
    assert distinct.all_distinct(pa.array(["a", "b", "c"])) is True
    assert distinct.all_distinct(pa.array(["a", "b", "a"])) is False


def test_result_rows_are_read_again_in_the_order_asked(tmp_path) -> None:
    path = tmp_path / "in.csv"
    rows = [(f"k{i}", f'v "{i}",\n{i}' if i % 7 == 0 else f"v{i}") for i in range(5000)]
    pd.DataFrame(rows, columns=["uid", "note"]).to_csv(path, index=False)
    inp = inspect_input(path, ("uid",))
    assert inp.table.column_names == ["uid"]  # the preflight keeps the keys only
    asked = np.array([4999, -1, 0, 2500, 7, -1, 14], dtype=np.int64)
    got = result_table(inp, asked)
    want = [rows[i] if i >= 0 else (None, None) for i in asked]
    assert list(zip(got["uid"].to_pylist(), got["note"].to_pylist())) == want


def test_an_input_changed_during_the_job_is_not_used_for_the_result(tmp_path) -> None:
    path = tmp_path / "in.csv"
    path.write_text("uid,v\na,1\nb,2\n")
    inp = inspect_input(path, ("uid",))
    path.write_text("uid,v\nb,2\na,1\nc,3\n")
    os.utime(path, ns=(1, 1))
    assert isinstance(inp.source, CsvSource)
    with pytest.raises(OutputError, match="changed while the job ran"):
        result_table(inp, np.array([0, 1]))


def test_spilled_keys_read_back_the_same_from_the_work_folder(tmp_path) -> None:
    path = tmp_path / "in.csv"
    path.write_text('uid,v\n"a,1",1\nb,2\n"c""",3\n')
    inp = inspect_input(path, ("uid",))
    before = inp.key_table(("uid",))
    work = tmp_path / "work"
    work.mkdir()
    inp.spill(work)
    assert (work / "keys.arrow").exists()
    assert inp.key_table(("uid",)).equals(before)
    assert result_table(inp, np.array([2, 0]))["v"].to_pylist() == ["3", "1"]


def canonical(value: str) -> str:
    """The canonical key of one value, by its definition (README, data.py)."""
    raw = value.encode()
    plain = raw and all(0x20 <= b < 0x7F and b not in b'",~' for b in raw)
    return value if plain else "~" + raw.hex()


def test_canonical_keys_match_their_definition_value_by_value() -> None:
    rng = random.Random(11)
    pieces = ["a", "1", " ", ",", '"', "~", "é", "\n", "\x7f", "}", "张"]
    for round_ in range(500):
        values = ["".join(rng.choices(pieces, k=rng.randrange(0, 6))) for _ in range(30)]
        arr = pa.array(values, pa.string()).slice(round_ % 3)  # offset slices too
        table = pa.table({"k": pa.chunked_array([arr.slice(0, 5), arr.slice(5)])})
        got = canonical_keys(table, ("k",)).to_pylist()
        assert got == [canonical(v) for v in values[round_ % 3 :]]


def test_a_plain_file_is_checked_by_hashes_and_by_its_keys_on_a_collision(
    tmp_path, monkeypatch
) -> None:
    path = tmp_path / "in.csv"
    path.write_text("uid,v\na,1\nb,2\nc,3\n")
    inp = inspect_input(path, ("uid",))
    assert inp.plain and inp.rows == 3 and inp.table.num_rows == 0  # hashed, not held
    monkeypatch.setattr(distinct, "value_hashes", lambda arr: np.zeros(len(arr), np.uint64))
    inp = inspect_input(path, ("uid",))  # every hash equal: the keys are read and compared
    assert inp.plain and inp.rows == 3 and inp.table.num_rows == 3
    path.write_text("uid,v\na,1\nb,2\na,3\n")
    with pytest.raises(PreflightError, match="1 duplicate key row"):
        inspect_input(path, ("uid",))


@pytest.mark.parametrize("chunk", [7, 1 << 20])
def test_the_checkpoint_digest_taken_while_checking_is_the_files_own(
    tmp_path, monkeypatch, chunk
) -> None:
    """The preflight feeds the bytes it checks to the checkpoint's hash on a worker thread, up
    to a few chunks behind: the digest is the one read separately from the file."""
    monkeypatch.setattr(data_mod, "_SCAN_CHUNK", chunk)
    rng = random.Random(5)
    path = tmp_path / "in.csv"
    rows = [f'"id{rng.randrange(10**9)}é",{i}' for i in range(3000)]
    path.write_text("uid,x\n" + "\n".join(dict.fromkeys(rows)) + "\n", encoding="utf-8")
    inp = inspect_input(path, ("uid",), digest=checkpoint.content_hash())
    assert inp.source.digest == checkpoint.input_digest(path)
    path.write_bytes(path.read_bytes() + b'"one more",1\n')
    assert inspect_input(path, ("uid",), digest=checkpoint.content_hash()).source.digest == (
        checkpoint.input_digest(path)
    )
    assert inspect_input(path, ("uid",)).source.digest is None  # not asked: not taken


def test_a_refused_input_leaves_no_digest_thread_behind(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(data_mod, "_SCAN_CHUNK", 64)
    path = tmp_path / "in.csv"
    path.write_bytes(b"uid\n" + b"".join(b"id%d\n" % i for i in range(2000)) + b"\xff\n")
    with pytest.raises(PreflightError, match="not UTF-8"):
        inspect_input(path, ("uid",), digest=checkpoint.content_hash())
    assert not [t for t in threading.enumerate() if t.name.startswith("input-digest")]
