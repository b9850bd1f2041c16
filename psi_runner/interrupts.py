"""Ctrl-C (SIGINT) and SIGTERM handling that no library can take away.

SecretFlow installs its own SIGINT handler, and a C++ library loaded during the PSI can replace
Python's handler at the C level; either way a Ctrl-C was sometimes simply lost and the job ran
on. The job process therefore blocks SIGINT and SIGTERM in every thread, and one thread takes
them with ``sigwait``. What happens then depends on the phase: by default the main thread gets a
KeyboardInterrupt (``interrupt_main``); during the PSI, the job installs a hook that tells the
peer, cleans up and ends the process at once (the main thread may be inside SPU's C++ code).
"""

from __future__ import annotations

import _thread
import signal
import threading
from collections.abc import Callable

_hook: Callable[[], None] | None = None
_lock = threading.Lock()
SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start() -> None:
    """Call first thing in the job process, before any other thread starts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    threading.Thread(target=_wait_for_sigint, daemon=True, name="sigint").start()


def set_hook(hook: Callable[[], None] | None) -> None:
    global _hook
    with _lock:
        _hook = hook


def _wait_for_sigint() -> None:
    # Ctrl-C in a terminal reaches both runner processes, and the parent forwards it too:
    # act on the first signal only.
    signal.sigwait(SIGNALS)
    with _lock:
        hook = _hook
    if hook is not None:
        hook()  # ends the process
    else:
        _thread.interrupt_main()
    while True:
        signal.sigwait(SIGNALS)
