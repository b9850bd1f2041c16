"""The embedded backend: SPU's PSI in the runner's own process, no Ray, no SecretFlow.

The link goes through the party's own broker (yacl blackbox link). Errors from SPU/yacl are
translated here, at the adapter boundary, into BackendError/PeerError with a next step; the
raw text stays in the log file.
"""

from __future__ import annotations

import logging

from ..spec import JobSpec
from .calls import CallFailed, PsiCall, execute
from .translate import translate_spu_error

log = logging.getLogger("psi_runner.backends.embedded")

__all__ = ["PsiCall", "run"]


def run(spec: JobSpec, party: str, call: PsiCall, env: dict[str, str], session: str,
        stages: dict[str, float], **_: object) -> int:
    """Create the link, run the PSI, return SPU's intersection count for this party."""
    try:
        report = execute(spec, party, call, env, session)
    except CallFailed as exc:
        log.error("%s failed: %s", exc.stage, exc)
        raise translate_spu_error(exc, spec, party, exc.stage) from exc
    stages["link_s"] = report["link_s"]
    stages["psi_s"] = report["psi_s"]
    log.info("job %s party %s: SPU report original=%d intersection=%d", spec.job_id, party,
             report["original_count"], report["intersection_count"])
    return report["intersection_count"]
