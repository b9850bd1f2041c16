"""Whether this machine has the disk and memory a job will need, estimated before the PSI.

A rough model, from measurements on a 2-core, 24 GB machine (RR22; bench/README.md):

* **disk**, in the run's work folder (where SPU keeps its scratch files): SPU's sorted copy of
  its input, bucket stores and intersection indices, about ``SPU_DISK_PER_ROW`` bytes a row,
  plus the canonical-key file and the spilled keys when the input is not handed to SPU as
  it is, plus the result (at most the size of the input).
* **memory**, of the party's largest process (with the ``embedded`` backend SPU runs inside
  the job process): SPU's own peak, about ``SPU_MEMORY_BASE`` plus ``SPU_MEMORY_PER_ROW`` a
  row up to 10M rows and 2 bytes a row past that (``spu_memory``); psi-run holds none of
  the input while SPU runs (its keys are dropped or spilled to the work folder before SPU
  starts), only a row number per normalised row kept.

A shortfall is a warning, not a refusal: the figures are estimates, and the other party's
processes on the same machine are not counted.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .csv_io import CsvSource
from .data import InputTable

SPU_DISK_PER_ROW = 65
SPU_MEMORY_BASE = 600_000_000
SPU_MEMORY_PER_ROW = 45
# Past 10M rows SPU's memory grows far slower (it sorts on disk, with GNU sort's 1 GB buffer):
# bare SPU peaked at 1.06 GB at 10M and 1.24 GB at 100M rows (RR22, bench/README.md).
SPU_MEMORY_KNEE_ROWS = 10_000_000
SPU_MEMORY_PER_ROW_PAST_KNEE = 2


@dataclass(frozen=True)
class Needs:
    """Estimated bytes of disk (in the work folder) and memory a party's job needs."""

    disk: int
    memory: int


def estimate(inp: InputTable) -> Needs:
    """What the job with input ``inp`` will need (see the module docstring)."""
    rows = inp.rows
    try:
        text = inp.source is None or isinstance(inp.source, CsvSource)
        input_bytes = os.stat(inp.path).st_size if text else 0
    except (OSError, TypeError):
        input_bytes = 0
    keys = inp.normalized.keys.nbytes if inp.normalized is not None else inp.table.nbytes
    held = inp.table.nbytes + (keys if inp.normalized is not None else 0)
    input_bytes = input_bytes or held  # Parquet or a database: about its text, held in memory
    if inp.keys_in_file:  # plain keys read again from the file for SPU: at most its size
        keys = input_bytes
    canonical = 0 if inp.plain else keys + 12 * rows  # key text (an upper bound) and row number
    # While SPU runs psi-run holds no keys (dropped, or spilled to the work folder: ``held``
    # more disk), only the input row of each normalised row kept.
    spilled = 0 if inp.plain else held
    kept = 8 * rows if inp.normalized is not None and inp.normalized.kept is not None else 0
    return Needs(
        disk=SPU_DISK_PER_ROW * rows + canonical + input_bytes + spilled,
        memory=spu_memory(rows) + kept,
    )


def spu_memory(rows: int) -> int:
    """SPU's own peak memory for ``rows`` rows (see the module docstring)."""
    below = min(rows, SPU_MEMORY_KNEE_ROWS)
    past = max(rows - SPU_MEMORY_KNEE_ROWS, 0)
    return SPU_MEMORY_BASE + SPU_MEMORY_PER_ROW * below + SPU_MEMORY_PER_ROW_PAST_KNEE * past


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_disk(folder: Path) -> int | None:
    """Free bytes on ``folder``'s file system for this user (None if it cannot be read)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def shortfalls(needs: Needs, folder: Path, disk: int | None, memory: int | None) -> list[str]:
    """One warning sentence per resource the machine lacks (``disk``/``memory``: what it has,
    None when unknown)."""
    out = []
    if disk is not None and disk < needs.disk:
        out.append(
            f"the job needs about {_gb(needs.disk)} of disk in {folder} (SPU's scratch files "
            f"and the result) but that file system has {_gb(disk)} free; free some space or "
            "set parties.<you>.work_dir to a larger one"
        )
    if memory is not None and memory < needs.memory:
        out.append(
            f"the job needs about {_gb(needs.memory)} of memory (SPU and the input) but this "
            f"machine has {_gb(memory)} available; the PSI may fail or be killed"
        )
    return out


def check(needs: Needs, folder: Path) -> list[str]:
    """The warnings for a job that needs ``needs`` and puts its work files in ``folder``."""
    return shortfalls(needs, folder, free_disk(folder), available_memory())


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
