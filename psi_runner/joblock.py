"""One run of a job at a time per party and output folder: an exclusive lock file.

``.psi-run-<party>-<job_id>.lock`` beside the output holds an ``flock`` for as long as the job
process lives (the kernel drops it when the process ends, however it ends), and names the
holder's process id and handshake nonce. A second run of the same job id for the same party and
output is refused in preflight, before it touches the control channel, so the first run and its
peer go on undisturbed; the refused run tells the peer (``BUSY_KIND``, naming the holder's
nonce), so a peer run that is waiting for *this* side learns why nothing answers, while a peer
run that talks to the holder ignores it (``handshake``).

The file is removed when its run ends; a file left by a killed run holds no lock and is taken
over. Taking the lock checks that the locked file is still the one at the path, because a run
that ends removes the file while another may just have opened it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from pathlib import Path

from .errors import PreflightError
from .spec import JobSpec

log = logging.getLogger("psi_runner.joblock")

BUSY_KIND = "another run of this job is in progress there"
_ATTEMPTS = 20


class JobBusy(PreflightError):
    """Another run of the same job id, party and output holds the lock; ``holder`` is its
    handshake nonce ("" if unknown)."""

    kind = BUSY_KIND

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message)
        self.holder = holder


def lock_path(spec: JobSpec, party: str) -> Path:
    """Where the lock of ``party``'s run of this job lives (beside the output, or in the work
    folder of a database output)."""
    return spec.parties[party].local_folder / f".psi-run-{party}-{spec.job_id}.lock"


class JobLock:
    """The held lock of one run; ``release()`` removes the file and drops the lock."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, spec: JobSpec, party: str, nonce: str) -> JobLock:
        """Take the lock now or raise ``JobBusy`` (never waits)."""
        path = lock_path(spec, party)
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise PreflightError(
                    f"job {spec.job_id}: cannot create the job's lock file {path} "
                    f"({exc.strerror}); check the output folder's permissions"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                    raise PreflightError(
                        f"job {spec.job_id}: cannot lock {path} ({exc.strerror})"
                    ) from None
                raise _busy(spec, party, path) from None
            if _same_file(path, fd):
                _write_holder(fd, nonce)
                return cls(path, fd)
            os.close(fd)  # the holder removed it as we opened it: take the new one
        raise PreflightError(f"job {spec.job_id}: could not take the lock {path}; try again")

    def release(self) -> None:
        """Remove the lock file, then drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _same_file(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _write_holder(fd: int, nonce: str) -> None:
    os.fchmod(fd, 0o600)  # a file taken over from a killed run may have another mode
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "nonce": nonce}).encode(), 0)


def _busy(spec: JobSpec, party: str, path: Path) -> JobBusy:
    holder: dict = {}
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        pass
    pid = holder.get("pid") if isinstance(holder, dict) else None
    nonce = holder.get("nonce") if isinstance(holder, dict) else None
    by = f" (process {pid})" if isinstance(pid, int) else ""
    return JobBusy(
        f"job {spec.job_id}: another run of this job for party {party} is still in progress "
        f"here{by}, writing to the same output; this run was refused and the other one goes "
        "on; run the job again when it has finished",
        holder=nonce if isinstance(nonce, str) else "",
    )
