"""Peak resident memory of the processes a benchmark starts, read from Linux's ``/proc``.

A background thread walks this process's descendants every ``interval`` seconds and keeps, for
every process, the largest ``VmHWM`` (the kernel's own high-water mark of its resident set)
seen. ``VmHWM`` only grows, so a process's peak is exact up to its last sample; only what it
allocates in its final ``interval`` before exiting can be missed. Each process is put in a
group by ``label(cmdline)`` of its top-level ancestor among our children (e.g. "alice" for
``psi-run ... --party alice`` and everything it forks); a group's figure is its *largest
process*, not the sum, as the issue asks.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
            except OSError:
                continue
            out.extend(int(c) for c in text.split())
    except OSError:
        pass
    return out


def _hwm_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode("utf-8", "replace") for p in raw.split(b"\0") if p]


class PeakRss:
    """Sample the peak RSS of our descendants, grouped by ``label`` of the top-level child.

    ``label`` gets a child's command line and returns its group, or None to ignore that child
    and its descendants (e.g. brokers). Use as a context manager around the run.
    """

    def __init__(self, label: Callable[[list[str]], str | None], interval: float = 0.05):
        self.label = label
        self.interval = interval
        self.peak: dict[int, int] = {}  # pid -> largest VmHWM seen
        self.group_of: dict[int, str] = {}  # top-level child pid -> group
        self._tops: dict[int, int] = {}  # pid -> its top-level child
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval):
                return

    def sample(self) -> None:
        """One walk over the descendants of this process."""
        for top in _children(os.getpid()):
            if top not in self.group_of:
                group = self.label(_cmdline(top))
                if group is None:
                    continue
                self.group_of[top] = group
            stack = [top]
            while stack:
                pid = stack.pop()
                self._tops[pid] = top
                hwm = _hwm_bytes(pid)
                if hwm > self.peak.get(pid, 0):
                    self.peak[pid] = hwm
                stack.extend(_children(pid))

    def largest(self) -> dict[str, int]:
        """Group -> peak RSS in bytes of its largest process."""
        out: dict[str, int] = {}
        for pid, hwm in self.peak.items():
            group = self.group_of.get(self._tops.get(pid, -1))
            if group is not None and hwm > out.get(group, 0):
                out[group] = hwm
        return out

    def summed(self) -> dict[str, int]:
        """Group -> the sum of its processes' peaks in bytes (an upper bound of what they held
        at once; a sharded job's SPU processes peak at about the same time)."""
        out: dict[str, int] = {}
        for pid, hwm in self.peak.items():
            group = self.group_of.get(self._tops.get(pid, -1))
            if group is not None:
                out[group] = out.get(group, 0) + hwm
        return out


def party_label(parties: tuple[str, ...]) -> Callable[[list[str]], str | None]:
    """Group by ``--party NAME`` (psi-run) or ``--rank I`` (bare_psi.py); others are ignored."""

    def label(cmd: list[str]) -> str | None:
        for flag in ("--party", "--rank"):
            if flag in cmd and cmd.index(flag) + 1 < len(cmd):
                value = cmd[cmd.index(flag) + 1]
                return parties[int(value)] if flag == "--rank" else value
        return None

    return label
