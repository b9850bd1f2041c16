"""Run the job in a forked child process and watch it from the parent.

SPU's C++ code can end a process with SIGABRT or SIGSEGV, and its link can log tens of MB per
second at a dead broker. So the job runs in a child whose stdout and stderr (C++ output
included) are a pipe that the parent copies into the log file through the log pump
(``logpump``); the parent forwards SIGINT/SIGTERM to the child, and turns a child killed by a
signal into ``EngineCrashed``. The child dies with the parent (``PR_SET_PDEATHSIG``), so no
orphan job runs on.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from .errors import EngineCrashed, Interrupted, PsiRunError
from .events import Events, parse_events
from .logpump import LogPump
from .workdir import create_private_tmp, remove_work_dir

# After the child has exited, a process it started may still hold the pipe open.
_DRAIN_QUIET_S = 0.5


def run_supervised(
    child: Callable[[Events], int],
    log_fd: int,
    on_event: Callable[[dict], None] = lambda event: None,
    on_line: Callable[[bytes], None] = lambda line: None,
) -> int:
    """Run ``child(events)`` in a forked process whose output goes to ``log_fd``; its exit code.

    ``on_event`` gets the child's events (``events``), ``on_line`` every line of its output
    (SPU's too). Raises ``EngineCrashed`` when the child is killed by a signal."""
    private_tmp = create_private_tmp()
    try:
        return _supervise(child, log_fd, on_event, on_line, private_tmp)
    finally:
        remove_work_dir(private_tmp)


def _supervise(
    child: Callable[[Events], int],
    log_fd: int,
    on_event: Callable[[dict], None],
    on_line: Callable[[bytes], None],
    private_tmp: Path,
) -> int:
    pipe_r, pipe_w = os.pipe()
    events_r, events_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        code = PsiRunError.exit_code
        try:
            os.close(pipe_r)
            os.close(events_r)
            os.close(log_fd)
            die_with_parent(parent)
            _redirect_output(pipe_w)
            os.environ["TMPDIR"] = str(private_tmp)
            tempfile.tempdir = None  # Python's tempfile reads TMPDIR again
            code = child(Events(events_w))
        finally:
            os._exit(code)
    os.close(pipe_w)
    os.close(events_w)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = _pump_until_exit(pid, pipe_r, events_r, log_fd, on_event, on_line)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise EngineCrashed(f"the PSI engine crashed ({name}); no result was written")
    return os.WEXITSTATUS(status)


def die_with_parent(parent: int, code: int = Interrupted.exit_code) -> None:
    """Linux: the kernel kills this process (SIGKILL) when ``parent``, the thread that forked
    or spawned it, ends, however it ends; exit with ``code`` at once if it already has."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(code)


def _redirect_output(pipe_w: int) -> None:
    """Send fd 1 and 2 (Python's and C++'s) into the pump's pipe."""
    os.dup2(pipe_w, 1)
    os.dup2(pipe_w, 2)
    os.close(pipe_w)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def _pump_until_exit(
    pid: int,
    pipe_r: int,
    events_r: int,
    log_fd: int,
    on_event: Callable[[dict], None],
    on_line: Callable[[bytes], None],
) -> int:
    """Copy the child's output into the log and pass on its events until it exits; its wait
    status."""
    pump = LogPump(log_fd, on_line=on_line)
    status: int | None = None
    quiet_since: float | None = None
    pending = b""
    readers = [pipe_r, events_r]
    while pipe_r in readers:
        ready, _, _ = select.select(readers, [], [], 0.2)
        if events_r in ready:
            data = os.read(events_r, 1 << 16)
            if not data:
                readers.remove(events_r)
            events, pending = parse_events(pending + data)
            for event in events:
                on_event(event)
        if pipe_r in ready:
            data = os.read(pipe_r, 1 << 16)
            if not data:
                break  # every writer is gone
            pump.feed(data)
            quiet_since = None
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
        if status is not None and not ready:
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > _DRAIN_QUIET_S:
                break
        on_event({"event": "tick"})
    pump.close()
    os.close(pipe_r)
    os.close(events_r)
    os.close(log_fd)
    if status is None:
        _, status = os.waitpid(pid, 0)
    return status
