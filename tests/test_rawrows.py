"""A CSV result written from the input's own lines (psi_runner/rawrows.py via data.write_result)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pytest

from psi_runner import rawrows
from psi_runner.data import inspect_input, result_table, write_result

ROWS = ['"a,1",x', '"q""2",y', "plain,z", '"张三","w, v"', "  sp ,u"]


def _file(tmp_path: Path, body: str, newline: str = "\n") -> Path:
    path = tmp_path / "in.csv"
    path.write_bytes(body.replace("\n", newline).encode())
    return path


def _values(path: Path) -> list[list[str]]:
    table = pcsv.read_csv(path, convert_options=pcsv.ConvertOptions(strings_can_be_null=False))
    return [[str(v) for v in row.values()] for row in table.to_pylist()]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_result_rows_are_the_input_lines_in_result_order(tmp_path, newline) -> None:
    path = _file(tmp_path, "uid,v\n" + "\n".join(ROWS) + "\n", newline)
    inp = inspect_input(path, ("uid",), keys_needed=True)
    rows = np.array([3, 0, 4, 1], dtype=np.int64)
    assert rawrows.line_starts(path, inp.rows) is not None
    dest = tmp_path / "out.csv"
    assert write_result(inp, rows, dest) == 4
    lines = path.read_bytes().split(newline.encode())
    assert dest.read_bytes() == newline.encode().join([lines[0], *(lines[r + 1] for r in rows)]) + (
        newline.encode()
    )
    want = result_table(inp, rows)  # the values Arrow's path would write
    assert _values(dest) == [[str(v) for v in r.values()] for r in want.to_pylist()]


def test_a_value_with_a_line_break_or_no_final_line_break_takes_arrows_path(tmp_path) -> None:
    broken = _file(tmp_path, 'uid,v\n"a\nb",x\nc,y\n')
    assert rawrows.line_starts(broken, 2) is None
    inp = inspect_input(broken, ("uid",), keys_needed=True)
    dest = tmp_path / "out.csv"
    assert write_result(inp, np.array([1, 0]), dest) == 2
    assert _values(dest) == [["c", "y"], ["a\nb", "x"]]
    unended = tmp_path / "unended.csv"
    unended.write_bytes(b"uid,v\na,x\nc,y")
    assert rawrows.line_starts(unended, 2) is None
    inp = inspect_input(unended, ("uid",), keys_needed=True)
    assert write_result(inp, np.array([1, 0]), dest) == 2
    assert _values(dest) == [["c", "y"], ["a", "x"]]


def test_large_result_is_copied_in_slices(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(rawrows, "_ROWS", 7)
    monkeypatch.setattr(rawrows, "_READ", 64)
    body = "uid,v\n" + "".join(f'"k,{i}",{i * 3}\n' for i in range(200))
    path = _file(tmp_path, body)
    inp = inspect_input(path, ("uid",), keys_needed=True)
    rows = np.random.default_rng(3).permutation(200)[:120]
    dest = tmp_path / "out.csv"
    assert write_result(inp, rows, dest) == 120
    assert _values(dest) == [[f"k,{r}", str(r * 3)] for r in rows]
