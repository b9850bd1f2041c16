"""A run's private work folder: beside the output (same file system), mode 0700, removed at
the end; the next run of the same party removes the folders of runs that were killed."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("psi_runner.workdir")


def _prefix(party: str) -> str:
    return f".psi-run-{party}-"


def create_private_tmp() -> Path:
    """A private (0700) temporary folder for this process and its children (``TMPDIR``).

    Libraries write there instead of the shared system temp folder (jax leaves an empty folder
    there on every import); the caller removes it at the end, and the next run removes those
    of runs that were killed."""
    system_tmp = Path(tempfile.gettempdir())
    remove_stale_work_dirs(system_tmp, "tmp")
    return Path(tempfile.mkdtemp(prefix=f"{_prefix('tmp')}{os.getpid()}-", dir=system_tmp))


def create_work_dir(folder: Path, party: str) -> Path:
    """A new private folder (0700) for this process's run of ``party`` in ``folder``."""
    remove_stale_work_dirs(folder, party)
    return Path(tempfile.mkdtemp(prefix=f"{_prefix(party)}{os.getpid()}-", dir=folder))


def remove_work_dir(path: Path | None) -> None:
    """Remove a work folder and everything in it (idempotent)."""
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_work_dirs(folder: Path, party: str) -> list[Path]:
    """Delete work folders left by runs of ``party`` that were killed (their process is gone)."""
    removed = []
    for path in folder.glob(f"{_prefix(party)}*-*"):
        pid_text = path.name[len(_prefix(party)) :].split("-", 1)[0]
        if not pid_text.isdigit() or not path.is_dir() or _alive(int(pid_text)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log.info("removed the work folder of a killed earlier run: %s", path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    return True
