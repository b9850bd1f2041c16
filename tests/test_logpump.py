"""Unit tests of the log pump that copies a job's output into its log file."""

from __future__ import annotations

import os
from pathlib import Path

from psi_runner.logpump import LogPump


def _pump(tmp_path: Path, **kw) -> tuple[LogPump, Path]:
    path = tmp_path / "job.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    return LogPump(fd, **kw), path


def test_a_storm_of_repeated_lines_is_counted_not_written(tmp_path):
    pump, path = _pump(tmp_path, repeats_kept=3)
    storm = b"".join(
        b"[2026-11-22 03:42:06.%03d] [error] Rpc failed, server_id=%d\n" % (i, i)
        for i in range(1000)
    )
    pump.feed(b"first line\n" + storm[:5000])
    pump.feed(storm[5000:] + b"after the storm\n")
    pump.close()
    lines = path.read_bytes().decode().splitlines()
    assert lines[0] == "first line"
    assert lines[1:4] == [
        f"[2026-11-22 03:42:06.{i:03d}] [error] Rpc failed, server_id={i}" for i in range(3)
    ]
    assert lines[4] == "[psi-run] the line above repeated 997 more times (not written)"
    assert lines[5:] == ["after the storm"]


def test_different_lines_and_a_partial_last_line_are_kept(tmp_path):
    pump, path = _pump(tmp_path, repeats_kept=2)
    pump.feed(b"a\nb\na\nb\nno newline at the e")
    pump.feed(b"nd")
    pump.close()
    assert path.read_bytes() == b"a\nb\na\nb\nno newline at the end\n"


def test_the_file_stops_growing_at_the_cap(tmp_path):
    pump, path = _pump(tmp_path, max_bytes=1000, repeats_kept=10**9)
    for i in range(200):
        pump.feed(f"line {'x' * i}\n".encode())
    pump.close()
    data = path.read_bytes()
    assert len(data) <= 1000 + 100
    assert (
        data.decode().splitlines()[-1]
        == "[psi-run] log file reached 1000 bytes; nothing more is written to it"
    )
