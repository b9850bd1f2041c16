"""The embedded backend: SPU's PSI on the party's own machine, no Ray, no SecretFlow.

The PSI runs in a child forked from the job process just for it (SPU's modules are already
imported there, ``prewarm``), which sends back SPU's report and ends. SPU does not hand all of
its memory back when the call returns (about 0.5 GB at 10M rows, measured), so in the job
process that memory would sit under the result check and the output; in a child it goes with
the child, and the job process's own peak stays below SPU's.

The link goes through the party's own broker (yacl blackbox link). Errors from SPU/yacl are
translated here, at the adapter boundary, into BackendError/PeerError with a next step; the
raw text stays in the log file and as the error's cause.
"""

from __future__ import annotations

import json
import logging
import os
import signal

from ..errors import BackendError, EngineCrashed
from ..spec import JobSpec
from ..supervisor import die_with_parent
from . import BackendResult
from .calls import CallFailed, PsiCall, execute
from .translate import translate_spu_error

log = logging.getLogger("psi_runner.backends.embedded")

# SPU's closed links, never dropped: dropping one waits for its receive thread's pending pop
# at the broker (up to 0.75 s). The PSI's process ends with os._exit, which runs no
# destructor, so nothing waits for them.
_CLOSED_LINKS: list = []


def extra_sessions(session: str) -> list[str]:
    """The embedded backend opens only the SPU link."""
    return []


def run(
    spec: JobSpec, party: str, call: PsiCall, env: dict[str, str], session: str
) -> BackendResult:
    """Create the link and run the PSI in a child process; SPU's report."""
    outcome = _in_child(spec, party, call, env, session)
    if "error" in outcome:
        exc = CallFailed(outcome["stage"], outcome["error"])
        log.error("%s failed: %s", exc.stage, exc)
        raise translate_spu_error(exc, spec, party, exc.stage) from exc
    report = outcome["report"]
    log.info(
        "job %s party %s: SPU report original=%d intersection=%d",
        spec.job_id,
        party,
        report["original_count"],
        report["intersection_count"],
    )
    return BackendResult(
        report["intersection_count"], {"link_s": report["link_s"], "psi_s": report["psi_s"]}
    )


def _in_child(spec: JobSpec, party: str, call: PsiCall, env: dict[str, str], session: str) -> dict:
    """``execute`` in a forked child: ``{"report": ...}`` or ``{"error", "stage"}``.

    The child inherits the job process's blocked SIGINT and SIGTERM (``interrupts``): Ctrl-C
    is the job process's to handle, and the child dies with it (``PR_SET_PDEATHSIG``), so a
    watchdog or Ctrl-C that ends the job process ends the PSI too."""
    read_fd, write_fd = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child never returns from here
        try:
            os.close(read_fd)
            die_with_parent(parent, 1)
            try:
                answer = {"report": execute(spec, party, call, env, session, keep=_CLOSED_LINKS)}
            except CallFailed as exc:
                answer = {"error": str(exc), "stage": exc.stage}
            except BaseException as exc:  # noqa: BLE001 - handed to the job process as text
                answer = {"error": f"{type(exc).__name__}: {exc}", "stage": "running the PSI"}
            body = memoryview(json.dumps(answer).encode())
            while body:
                body = body[os.write(write_fd, body) :]
        finally:
            os._exit(0)
    os.close(write_fd)
    try:
        chunks = []
        while chunk := os.read(read_fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
    if chunks:
        return json.loads(b"".join(chunks))
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise EngineCrashed(f"the PSI engine crashed ({name}); no result was written")
    raise BackendError(
        f"job {spec.job_id}: SPU's process exited ({os.WEXITSTATUS(status)}) without a result; "
        "see the log file"
    )
