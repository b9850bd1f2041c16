"""The canonical-key file SPU reads (``data.write_spu_input``) written slice by slice in the
order of each key's first 8 bytes: the same (key, position) rows, and the same file once GNU
sort has sorted it the way SPU does, so SPU computes exactly what it would on the file order."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.csv as pcsv
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psi_runner import data, keycode, resources
from psi_runner.preflight import result_copy_fits

values = st.text(st.sampled_from('ab1~,"\n é张🙂\x7f'), min_size=0, max_size=12)


def _words_by_definition(texts: list[str]) -> list[int]:
    return [int.from_bytes(t.encode("utf-8")[:8].ljust(8, b"\0"), "big") for t in texts]


@settings(max_examples=200, deadline=None)
@given(texts=st.lists(values, max_size=30), cut=st.integers(0, 30), large=st.booleans())
def test_prefix_words_are_the_first_8_bytes_big_endian(texts, cut, large) -> None:
    arr = pa.array(texts, pa.large_string() if large else pa.string())
    cut = min(cut, len(texts))
    for part, expected in ((arr, texts), (arr.slice(cut), texts[cut:])):  # offset 0 and not
        assert data._prefix_words(part).tolist() == _words_by_definition(expected)


def _inp(tmp_path: Path, keys: list[str]) -> data.InputTable:
    return data.InputTable(
        path=tmp_path / "in.csv", columns=["uid"], table=pa.table({"uid": keys}), plain=False
    )


def _rows(path: Path) -> list[tuple[str, int]]:
    types = {data.KEY_COLUMN: pa.string(), data.ROW_COLUMN: pa.int64()}
    t = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(column_types=types))
    return list(zip(t[data.KEY_COLUMN].to_pylist(), t[data.ROW_COLUMN].to_pylist()))


@settings(max_examples=60, deadline=None)
@given(
    keys=st.lists(values, max_size=40),
    slice_rows=st.integers(1, 9),
    code=st.sampled_from([keycode.ESCAPE, keycode.HEX]),
)
def test_presorted_file_holds_the_same_rows_each_slice_in_prefix_order(
    tmp_path_factory, keys, slice_rows, code
) -> None:
    folder = tmp_path_factory.mktemp("presort")
    keys = list(dict.fromkeys(keys))  # the preflight refuses duplicates unless allowed
    inp = _inp(folder, keys)
    with mock.patch.object(data, "_WRITE_SLICE", slice_rows):
        data.write_spu_input(inp, ("uid",), folder / "plain.csv", code)
        data.write_spu_input(inp, ("uid",), folder / "sorted.csv", code, presort="fast")
    in_file_order = _rows(folder / "plain.csv")
    presorted = _rows(folder / "sorted.csv")
    assert [p for _, p in in_file_order] == list(range(len(keys)))
    assert sorted(presorted, key=lambda r: r[1]) == in_file_order
    for start in range(0, len(keys), slice_rows):
        part = presorted[start : start + slice_rows]
        assert {p for _, p in part} == set(range(start, min(start + slice_rows, len(keys))))
        words = _words_by_definition([k for k, _ in part])
        assert words == sorted(words)


def _gnu_sort(path: Path) -> bytes:
    """What SPU 0.9.3b0 does first with its input (the command it logs), header dropped."""
    body = b"".join(path.read_bytes().splitlines(keepends=True)[1:])
    return subprocess.run(
        ["sort", "--stable", "--field-separator=,", "--key=1,1"],
        input=body,
        env={"LC_ALL": "C", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=True,
    ).stdout


@pytest.mark.parametrize("duplicates", [False, True])
def test_spu_sorts_the_presorted_file_into_the_same_file(tmp_path: Path, duplicates) -> None:
    """Rows that share 8 bytes and more, across several slices; with duplicate keys (allowed
    by the spec) the ``stable`` order keeps equal keys in file order, as SPU's sort would."""
    rng = random.Random(12)
    stems = ["customer", "~client", "id,00", "é张", "x"]
    keys = [f"{rng.choice(stems)}{rng.randrange(10**6)}" for _ in range(3000)]
    keys = list(dict.fromkeys(keys))
    if duplicates:
        keys += rng.sample(keys, 400)
        rng.shuffle(keys)
    inp = _inp(tmp_path, keys)
    with mock.patch.object(data, "_WRITE_SLICE", 700):
        data.write_spu_input(inp, ("uid",), tmp_path / "plain.csv", keycode.ESCAPE)
        data.write_spu_input(
            inp,
            ("uid",),
            tmp_path / "sorted.csv",
            keycode.ESCAPE,
            presort="stable" if duplicates else "fast",
        )
    assert (tmp_path / "plain.csv").read_bytes() != (tmp_path / "sorted.csv").read_bytes()
    assert _gnu_sort(tmp_path / "sorted.csv") == _gnu_sort(tmp_path / "plain.csv")


def test_the_result_copy_stays_below_spus_memory_or_spu_reads_the_file_as_it_is() -> None:
    """Plain keys go to SPU in key order only while copying the result's lines from the input
    (the input mapped, 16 bytes a row) stays below SPU's own estimated peak: at 10M rows of
    22 bytes it does; at 100M (measured: 3.4 GB against SPU's 1.2 GB) it does not."""
    assert result_copy_fits(22 * 10**7, 10**7)
    assert not result_copy_fits(22 * 10**8, 10**8)
    for rows in (10**3, 10**6, 10**7, 10**8):
        fits = result_copy_fits(22 * rows, rows)
        assert fits == (22 * rows + 16 * rows <= resources.spu_memory(rows))
