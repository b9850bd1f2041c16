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
import time
from collections.abc import Callable

from .errors import EngineCrashed, Interrupted, PsiRunError
from .logpump import LogPump

# After the child has exited, a process it started may still hold the pipe open.
_DRAIN_QUIET_S = 0.5


def run_supervised(child: Callable[[], int], log_fd: int) -> int:
    """Run ``child()`` in a forked process whose output goes to ``log_fd``; its exit code.

    Raises ``EngineCrashed`` when the child is killed by a signal."""
    pipe_r, pipe_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        code = PsiRunError.exit_code
        try:
            os.close(pipe_r)
            os.close(log_fd)
            _die_with_parent(parent)
            _redirect_output(pipe_w)
            code = child()
        finally:
            os._exit(code)
    os.close(pipe_w)

    def forward(signum: int, _frame: object) -> None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = _pump_until_exit(pid, pipe_r, log_fd)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise EngineCrashed(f"the PSI engine crashed ({name}); no result was written")
    return os.WEXITSTATUS(status)


def _die_with_parent(parent: int) -> None:
    """Linux: end the child when the parent is killed (even by SIGKILL)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(Interrupted.exit_code)


def _redirect_output(pipe_w: int) -> None:
    """Send fd 1 and 2 (Python's and C++'s) into the pump's pipe."""
    os.dup2(pipe_w, 1)
    os.dup2(pipe_w, 2)
    os.close(pipe_w)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def _pump_until_exit(pid: int, pipe_r: int, log_fd: int) -> int:
    """Copy the child's output into the log until it exits; its wait status."""
    pump = LogPump(log_fd)
    status: int | None = None
    quiet_since: float | None = None
    while True:
        ready, _, _ = select.select([pipe_r], [], [], 0.2)
        if ready:
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
    pump.close()
    os.close(pipe_r)
    os.close(log_fd)
    if status is None:
        _, status = os.waitpid(pid, 0)
    return status
