"""The embedded backend: SPU's PSI in the runner's own process, no Ray, no SecretFlow.

The link goes through the party's own broker (yacl blackbox link). Errors from SPU/yacl are
translated here, at the adapter boundary, into BackendError/PeerError with a next step; the
raw text stays in the log file and as the error's cause.
"""

from __future__ import annotations

import logging

from ..spec import JobSpec
from . import BackendResult
from .calls import CallFailed, PsiCall, execute
from .translate import translate_spu_error

log = logging.getLogger("psi_runner.backends.embedded")

# SPU's closed links, never dropped: dropping one waits for its receive thread's pending pop
# at the broker (up to 0.75 s, after the PSI, before the result check). The job process ends
# with os._exit (``supervisor``), which runs no destructor, so nothing waits for them.
_CLOSED_LINKS: list = []


def extra_sessions(session: str) -> list[str]:
    """The embedded backend opens only the SPU link."""
    return []


def run(
    spec: JobSpec, party: str, call: PsiCall, env: dict[str, str], session: str
) -> BackendResult:
    """Create the link and run the PSI in this process."""
    try:
        report = execute(spec, party, call, env, session, keep=_CLOSED_LINKS)
    except CallFailed as exc:
        log.error("%s failed: %s", exc.stage, exc)
        raise translate_spu_error(exc, spec, party, exc.stage) from exc
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
