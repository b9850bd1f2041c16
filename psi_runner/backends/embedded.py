"""The embedded backend: SPU's PSI v2 in the runner's own process, no Ray.

The link goes through the party's own broker (yacl blackbox link). Errors from SPU/yacl are
translated here, at the adapter boundary, into BackendError/PeerError with a next step; the
raw text stays in the log file.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ..link import create_blackbox_link
from ..spec import JobSpec
from .translate import translate_spu_error

log = logging.getLogger("psi_runner.backends.embedded")


@dataclass
class PsiCall:
    """Everything one party passes to SPU; identical on both sides but for the paths."""

    input_path: Path
    output_path: Path
    keys: tuple[str, ...]


def build_config(spec: JobSpec, party: str, call: PsiCall):
    from spu import psi_v2_pb2 as v2

    protocol = getattr(v2, f"PROTOCOL_{spec.protocol}")
    role = v2.ROLE_RECEIVER if party == spec.receiver else v2.ROLE_SENDER
    config = v2.PsiConfig(
        protocol_config=v2.ProtocolConfig(
            protocol=protocol, role=role, broadcast_result=spec.broadcast_result
        ),
        input_config=v2.IoConfig(type=v2.IO_TYPE_FILE_CSV, path=str(call.input_path)),
        output_config=v2.IoConfig(type=v2.IO_TYPE_FILE_CSV, path=str(call.output_path)),
        keys=list(call.keys),
        # psi-run has already checked the keys for duplicates (or the spec allows them).
        skip_duplicates_check=True,
    )
    if spec.protocol == "ECDH":
        from spu import psi_pb2

        config.protocol_config.ecdh_config.curve = psi_pb2.CurveType.Value(spec.ecdh_curve)
    return config


def run(spec: JobSpec, party: str, call: PsiCall, env: dict[str, str], session: str,
        stages: dict[str, float]) -> int:
    """Create the link, run the PSI, return SPU's intersection count for this party."""
    from spu import psi as spu_psi

    parties = spec.party_names
    t0 = time.monotonic()
    try:
        lctx = create_blackbox_link(spec.link, parties, party, session, env)
    except Exception as exc:  # noqa: BLE001 - SPU raises plain RuntimeError
        log.error("link creation failed: %s", exc)
        raise translate_spu_error(exc, spec, party, "creating the SPU link") from exc
    stages["link_s"] = time.monotonic() - t0
    t1 = time.monotonic()
    try:
        report = spu_psi.psi(build_config(spec, party, call), lctx)
    except Exception as exc:  # noqa: BLE001
        log.error("PSI failed: %s", exc)
        raise translate_spu_error(exc, spec, party, "running the PSI") from exc
    finally:
        try:
            lctx.stop_link()
        except Exception:  # noqa: BLE001 - the link may already be gone
            log.debug("stop_link failed", exc_info=True)
    stages["psi_s"] = time.monotonic() - t1
    log.info("job %s party %s: SPU report original=%d intersection=%d", spec.job_id, party,
             report.original_count, report.intersection_count)
    # A party that does not receive the result gets -1 from SPU.
    return int(report.intersection_count)
