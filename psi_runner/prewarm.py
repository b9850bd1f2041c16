"""SPU's Python modules imported in a background thread, while the preflight reads the input
and the handshake waits for the peer, instead of after them on the PSI's critical path.

Importing ``spu`` (its link and PSI bindings) takes about 0.4 s here; the preflight's Arrow
work runs outside the GIL, so the two overlap. The import is only a warm-up: a failure here is
ignored (the real import in the backend reports it), and the PSI waits for the thread before
it starts, so no fork (shards) happens while an import is half done.
"""

from __future__ import annotations

import importlib
import threading

_MODULES = ("spu.libspu.link", "spu.psi")


def _import_all() -> None:
    for name in _MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - the backend's own import names the problem
            return


def start() -> threading.Thread:
    """Begin importing SPU's modules in a daemon thread."""
    thread = threading.Thread(target=_import_all, name="spu-prewarm", daemon=True)
    thread.start()
    return thread


def wait(thread: threading.Thread | None, timeout_s: float = 60.0) -> None:
    """Let the warm-up finish (bounded) before the PSI starts."""
    if thread is not None:
        thread.join(timeout_s)
