"""Unit tests of input inspection and the canonical key encoding (psi_runner/data.py)."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from psi_runner.data import canonical_keys, inspect_input, result_table
from psi_runner.errors import PreflightError

PLAIN = re.compile(r"^[ !#-+\x2d-}]+$")  # printable ASCII without '"', ',' and '~'
ENCODED = re.compile(r"^~[0-9a-f]*$")

VALUES = [
    "",
    "~",
    "~7e",
    "7e",
    "a,b",
    'q"x',
    "张三",
    " x ",
    "a-b",
    "-",
    "emoji 🙂",
    "multi\nline",
    "plain",
    "7E",
    "a",
    "b",
    "c",
    "b-c",
    "~~",
    "tab\there",
    "x" * 300,
]


def canon(columns: dict[str, list[str]], chunks: int = 1) -> list[str]:
    table = pa.table({k: pa.array(v, pa.string()) for k, v in columns.items()})
    if chunks > 1:  # the same rows split over several chunks, with sliced (offset) arrays
        table = pa.concat_tables([table.slice(i, 1) for i in range(table.num_rows)])
    return canonical_keys(table, tuple(columns)).to_pylist()


def test_reference_regex_is_the_module_alphabet() -> None:
    allowed = {chr(c) for c in range(32, 127)} - {'"', ",", "~"}
    assert {chr(c) for c in range(0x3000) if PLAIN.match(chr(c))} == allowed


def test_module_alphabet_per_character() -> None:
    # Every printable ASCII character except '"', ',' and '~' is kept; all else is encoded.
    chars = [chr(c) for c in range(128)] + ["é", "\u00a0", "张"]
    keys = canon({"uid": chars})
    kept = {c for c, k in zip(chars, keys) if k == c}
    assert kept == {chr(c) for c in range(32, 127)} - {'"', ",", "~"}
    for c, k in zip(chars, keys):
        if c not in kept:
            assert k == "~" + c.encode().hex()


@pytest.mark.parametrize("chunks", [1, 2])
def test_single_column_plain_unchanged_others_hex(chunks: int) -> None:
    keys = canon({"uid": VALUES}, chunks=chunks)
    for value, key in zip(VALUES, keys):
        if PLAIN.match(value):
            assert key == value
        else:
            assert ENCODED.match(key), (value, key)
            assert bytes.fromhex(key[1:]).decode("utf-8") == value
    assert keys[VALUES.index("")] == "~"
    assert keys[VALUES.index("~")] == "~7e"
    assert keys[VALUES.index("~7e")] == "~7e3765"
    assert keys[VALUES.index("7e")] == "7e"
    assert keys[VALUES.index("a-b")] == "a-b"
    assert keys[VALUES.index(" x ")] == " x "


@pytest.mark.parametrize("chunks", [1, 2])
def test_single_column_injective(chunks: int) -> None:
    values = VALUES + VALUES[::-1]  # every value twice
    keys = canon({"uid": values}, chunks=chunks)
    for (v1, k1), (v2, k2) in itertools.combinations(zip(values, keys), 2):
        assert (v1 == v2) == (k1 == k2), (v1, v2, k1, k2)


@pytest.mark.parametrize("chunks", [1, 2])
def test_two_columns_injective_and_in_alphabet(chunks: int) -> None:
    pairs = [*list(itertools.product(VALUES[:14], repeat=2)), ("a-b", "c"), ("a", "b-c")]
    keys = canon({"k1": [a for a, _ in pairs], "k2": [b for _, b in pairs]}, chunks=chunks)
    seen: dict[str, tuple[str, str]] = {}
    for pair, key in zip(pairs, keys):
        assert PLAIN.match(key), (pair, key)
        assert key.count("-") == 1
        left, right = key.split("-")
        assert (bytes.fromhex(left).decode(), bytes.fromhex(right).decode()) == pair
        if key in seen:
            assert seen[key] == pair
        seen[key] = pair
    assert len(seen) == len(set(pairs))
    assert keys[-2] != keys[-1]  # ("a-b", "c") vs ("a", "b-c")


def test_two_columns_same_tuple_same_key_across_tables() -> None:
    first = canon({"a": ["x", "张三", ""], "b": ["1", 'q"x', ""]})
    second = canon({"a": ["", "x", "张三"], "b": ["", "1", 'q"x']})
    assert first == [second[1], second[2], second[0]]
    assert first[2] == "-"


def test_three_columns_with_empty_values_differ() -> None:
    keys = canon({"a": ["", "", "a"], "b": ["", "a", ""], "c": ["a", "", ""]})
    assert len(set(keys)) == 3


# --- inspect_input -------------------------------------------------------------------------


def write(tmp_path: Path, data: bytes | str, name: str = "in.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def error_of(path: Path, keys=("uid",), **kw) -> str:
    with pytest.raises(PreflightError) as info:
        inspect_input(path, keys, **kw)
    return str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    msg = error_of(tmp_path / "nope.csv")
    assert "nope.csv" in msg and "file not found" in msg


def test_folder(tmp_path: Path) -> None:
    assert "is a folder" in error_of(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, b"uid\n\xff\xfe\n"))
    assert "not UTF-8" in msg
    assert "line 2" in msg


@pytest.mark.parametrize("content", ["", "\n\n", "   "])
def test_empty_file(tmp_path: Path, content: str) -> None:
    assert "the file is empty" in error_of(write(tmp_path, content))


def test_key_column_missing(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "id,name\n1,a\n"))
    assert "key column 'uid' not found" in msg
    assert "the columns are: id, name" in msg


def test_second_key_column_missing(tmp_path: Path) -> None:
    msg = error_of(write(tmp_path, "uid,name\n1,a\n"), keys=("uid", "region"))
    assert "key column 'region' not found" in msg


@pytest.mark.parametrize(
    "content, line",
    [
        ("uid\na\n\nb\n", 3),
        ("uid\na\nb\n\nc\n", 4),
        ("uid\r\na\r\n\r\nb\r\n", 3),
    ],
)
def test_blank_line(tmp_path: Path, content: str, line: int) -> None:
    msg = error_of(write(tmp_path, content))
    assert f"line {line} is blank" in msg


def test_blank_first_line_is_a_missing_header(tmp_path: Path) -> None:
    assert "header missing" in error_of(write(tmp_path, "\nuid\na\n"))


def test_single_final_newline_is_not_blank(tmp_path: Path) -> None:
    assert inspect_input(write(tmp_path, "uid\na\nb\n"), ("uid",)).rows == 2
    assert inspect_input(write(tmp_path, "uid\na\nb"), ("uid",)).rows == 2


def test_duplicate_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "uid,v\na,1\nb,2\na,3\nc,4\na,5\nb,6\n")
    msg = error_of(path)
    assert "3 duplicate key row(s) in 2 key(s)" in msg
    assert "e.g. uid='a'" in msg or "e.g. uid='b'" in msg
    assert "allow_duplicate_keys" in msg
    assert inspect_input(path, ("uid",), allow_duplicates=True).rows == 6


def test_duplicate_two_column_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "k1,k2\na,1\na,2\nb,1\na,1\n")
    msg = error_of(path, keys=("k1", "k2"))
    assert "1 duplicate key row(s) in 1 key(s), e.g. k1='a', k2='1'" in msg
    # the same values in a different column combination are not duplicates
    assert inspect_input(write(tmp_path, "k1,k2\na,b\nb,a\n", "ok.csv"), ("k1", "k2")).rows == 2


def test_header_only(tmp_path: Path) -> None:
    assert "has a header but no rows" in error_of(write(tmp_path, "uid,name\n"))
    assert "has a header but no rows" in error_of(write(tmp_path, "uid", "nonl.csv"))


def test_duplicate_header_column(tmp_path: Path) -> None:
    assert "header names column 'uid' twice" in error_of(write(tmp_path, "uid,uid\n1,2\n"))


def test_plain_simple_file(tmp_path: Path) -> None:
    inp = inspect_input(write(tmp_path, "uid,age\nu1,3\nu-2,4\nx y,5\n"), ("uid",))
    assert inp.plain is True
    assert inp.columns == ["uid", "age"]
    assert inp.rows == 3
    assert inp.table.num_rows == 0  # a plain file's keys are hashed, not held
    inp.load_keys(("uid",))  # read again if the job needs them after all
    assert inp.table.column("uid").to_pylist() == ["u1", "u-2", "x y"]
    assert inp.table.column_names == ["uid"]  # only the keys
    rows = result_table(inp, np.arange(3))  # the rest is read again for the result
    assert rows.column("age").to_pylist() == ["3", "4", "5"]
    assert rows.schema.field("age").type == pa.string()  # numbers stay text


@pytest.mark.parametrize(
    "content",
    [
        'uid,note\na,"say ""hi"""\nb,x\n',  # a quote in a non-key value
        'uid\n"a""b"\nc\n',  # a quote in a key
        "uid\n张三\nb\n",  # non-ASCII key
        "uid\r\na\r\nb\r\n",  # CRLF line endings
        "uid\n~a\nb\n",  # '~' is the encoding marker
        "uid,v\n,1\nb,2\n",  # an empty key is encoded
        "\ufeffuid\na\nb\n",  # BOM
    ],
)
def test_not_plain(tmp_path: Path, content: str) -> None:
    inp = inspect_input(write(tmp_path, content), ("uid",))
    assert inp.plain is False
    assert inp.columns[0] == "uid"


def test_two_key_columns_never_plain(tmp_path: Path) -> None:
    inp = inspect_input(write(tmp_path, "a,b\n1,2\n3,4\n"), ("a", "b"))
    assert inp.plain is False


def test_crlf_and_quoted_values_read_correctly(tmp_path: Path) -> None:
    inp = inspect_input(
        write(tmp_path, 'uid,v\r\n"a,b",1\r\n"q""x",2\r\n"multi\nline",3\r\n'), ("uid",)
    )
    assert inp.table.column("uid").to_pylist() == ["a,b", 'q"x', "multi\nline"]
    rows = result_table(inp, np.array([2, -1, 0]))
    assert rows.column("v").to_pylist() == ["3", None, "1"]


@pytest.mark.parametrize("seed", range(5))
def test_duplicate_check_by_partition_agrees_with_pandas(tmp_path: Path, seed: int) -> None:
    import random

    import pandas as pd

    from psi_runner.data import _all_distinct

    rng = random.Random(seed)
    pool = ["", "a", "b", "ab", "张三", "a,b", 'q"x', "x" * 40, *(f"k{i}" for i in range(500))]
    values = rng.sample(pool, 300)
    if seed % 2:  # one repeat, anywhere
        values.insert(rng.randrange(len(values)), rng.choice(values))
    for kind in (pa.string(), pa.large_string()):
        arr = pa.array(values, kind)
        chunked = pa.chunked_array([arr.slice(0, 100), arr.slice(100)])  # offset slices
        want = not pd.Series(values).duplicated().any()
        assert _all_distinct(chunked) is want
