"""The preflight estimate of disk and memory (psi_runner/resources.py)."""

from __future__ import annotations

from pathlib import Path

from psi_runner import resources
from psi_runner.data import inspect_input


def _input(tmp_path: Path, rows: int, quoted: bool = False, name: str = "in.csv"):
    path = tmp_path / name
    q = '"' if quoted else ""
    lines = [f"{q}u{i:08d}{q},{i}" for i in range(rows)]
    path.write_text("uid,x\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return inspect_input(path, ("uid",))


def test_needs_grow_with_rows_and_the_canonical_file_costs_disk(tmp_path: Path) -> None:
    small, big = _input(tmp_path, 1000, name="s.csv"), _input(tmp_path, 20_000, name="b.csv")
    s, b = resources.estimate(small), resources.estimate(big)
    assert b.disk > s.disk >= resources.SPU_DISK_PER_ROW * 1000
    assert b.memory > s.memory > resources.SPU_MEMORY_BASE
    assert big.plain
    big.plain = False  # the same rows through the canonical-key file need more disk
    assert resources.estimate(big).disk > b.disk


def test_a_shortfall_is_one_warning_line_naming_what_is_needed_and_what_there_is(
    tmp_path: Path,
) -> None:
    needs = resources.Needs(disk=650_000_000_000, memory=30_000_000_000)
    lines = resources.shortfalls(needs, tmp_path, disk=10_000_000_000, memory=8_000_000_000)
    assert len(lines) == 2
    assert all("\n" not in line for line in lines)
    assert "650.0 GB of disk" in lines[0] and "10.0 GB free" in lines[0]
    assert str(tmp_path) in lines[0] and "work_dir" in lines[0]
    assert "30.0 GB of memory" in lines[1] and "8.0 GB available" in lines[1]
    assert resources.shortfalls(needs, tmp_path, disk=None, memory=None) == []  # unknown
    assert resources.shortfalls(needs, tmp_path, disk=10**15, memory=10**15) == []


def test_a_small_job_on_this_machine_warns_of_nothing(tmp_path: Path) -> None:
    inp = _input(tmp_path, 100)
    assert resources.free_disk(tmp_path) and resources.available_memory()
    assert resources.check(resources.estimate(inp), tmp_path) == []
