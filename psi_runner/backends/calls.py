"""The one PSI call both parties make, built from the spec: SPU's v2 ``psi`` or legacy ``psi_csv``.

Every backend runs ``execute`` (in the runner's process, in a SecretFlow PYU thread, or in a
worker of the party's Ray cluster), so the call that reaches SPU is the same by construction.
Names and defaults follow SecretFlow's ``SPU.psi`` and ``SPU.psi_csv``, which differ:

=================  =============================  ===============================
spec               ``api: psi`` (PSI v2)          ``api: psi_csv`` (bucket PSI)
=================  =============================  ===============================
protocol RR22      PROTOCOL_RR22                  RR22_FAST_PSI_2PC
protocol KKRT      PROTOCOL_KKRT                  KKRT_PSI_2PC
protocol ECDH      PROTOCOL_ECDH                  ECDH_PSI_2PC
ecdh_curve         ecdh_config.curve              curve_type
receiver           role RECEIVER / SENDER         receiver_rank
join               advanced_join_type, left_side  (inner only)
duplicates         checked by psi-run;            checked by psi-run (precheck off)
                   keys_unique left unset
output order       SPU's alignment order          sorted by key (SecretFlow default)
=================  =============================  ===============================

SecretFlow's own defaults that psi-run does not take: ``SPU.psi`` uses curve FOURQ and
``advanced_join_type=INNER_JOIN`` (a cartesian join for duplicates); psi-run always names the
curve (default CURVE_25519, as ``psi_csv``) and maps ``join: inner`` to the plain intersection.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..data import NULL_TEXT
from ..link import create_blackbox_link
from ..spec import JobSpec

log = logging.getLogger("psi_runner.backends.calls")
_V1_PROTOCOLS = {"ECDH": "ECDH_PSI_2PC", "KKRT": "KKRT_PSI_2PC", "RR22": "RR22_FAST_PSI_2PC"}
_JOINS = {
    "left": "ADVANCED_JOIN_TYPE_LEFT_JOIN",
    "right": "ADVANCED_JOIN_TYPE_RIGHT_JOIN",
    "full": "ADVANCED_JOIN_TYPE_FULL_JOIN",
    "difference": "ADVANCED_JOIN_TYPE_DIFFERENCE",
}


@dataclass
class PsiCall:
    """Everything one party passes to SPU; identical on both sides but for the paths."""

    input_path: Path
    output_path: Path
    keys: tuple[str, ...]
    scratch: Path | None = None  # SPU's TMPDIR (default: the output's folder)
    recovery_folder: Path | None = None  # SPU's checkpoints (RR22/KKRT resume)


def v2_config(spec: JobSpec, party: str, call: PsiCall):
    """SPU PSI v2 config, as SecretFlow's ``SPU.psi`` builds it."""
    from spu import psi_pb2
    from spu import psi_v2_pb2 as v2

    def role(name: str | None) -> int:
        return v2.ROLE_RECEIVER if name == spec.receiver else v2.ROLE_SENDER

    config = v2.PsiConfig(
        protocol_config=v2.ProtocolConfig(
            protocol=getattr(v2, f"PROTOCOL_{spec.protocol}"),
            role=role(party),
            broadcast_result=spec.broadcast_result,
        ),
        input_config=v2.IoConfig(type=v2.IO_TYPE_FILE_CSV, path=str(call.input_path)),
        output_config=v2.IoConfig(type=v2.IO_TYPE_FILE_CSV, path=str(call.output_path)),
        keys=list(call.keys),
        # psi-run has already checked the keys for duplicates (or the spec allows them).
        skip_duplicates_check=True,
    )
    # input_attr.keys_unique stays unset (false): with it set, SPU 0.9.3b0 takes another
    # code path that fails on an empty intersection and misaligns the two outputs.
    if spec.join != "inner":
        config.advanced_join_type = v2.PsiConfig.AdvancedJoinType.Value(_JOINS[spec.join])
        config.left_side = role(spec.left_side)
        config.output_attr.csv_null_rep = NULL_TEXT
    if spec.protocol == "ECDH":
        config.protocol_config.ecdh_config.curve = psi_pb2.CurveType.Value(spec.ecdh_curve)
    # SPU writes its trace to /tmp unless told otherwise: keep it in the private work folder.
    config.debug_options.trace_path = str(call.output_path.parent / "spu.trace")
    if call.recovery_folder is not None:
        config.recovery_config.enabled = True
        config.recovery_config.folder = str(call.recovery_folder)
    return config


def v1_config(spec: JobSpec, party: str, call: PsiCall):
    """Legacy bucket PSI config, as SecretFlow's ``SPU.psi_csv`` builds it."""
    from spu import psi as spu_psi

    return spu_psi.BucketPsiConfig(
        psi_type=spu_psi.PsiType.Value(_V1_PROTOCOLS[spec.protocol]),
        broadcast_result=spec.broadcast_result,
        receiver_rank=spec.party_names.index(spec.receiver),
        input_params=spu_psi.InputParams(
            path=str(call.input_path),
            select_fields=list(call.keys),
            precheck=False,  # psi-run's preflight has checked for duplicates
        ),
        output_params=spu_psi.OutputParams(path=str(call.output_path), need_sort=True),
        curve_type=spu_psi.CurveType.Value(spec.ecdh_curve),
        bucket_size=1 << 20,
    )


class CallFailed(Exception):
    """SPU failed; ``stage`` says whether at the link or in the PSI (text is SPU's own)."""

    def __init__(self, stage: str, text: str) -> None:
        super().__init__(text)
        self.stage = stage


# yacl's stop_link waits until every message the peer says it sent has arrived; after a
# failure one may never come, and an unbounded wait would hang both sides for good.
STOP_AFTER_SUCCESS_S = 60.0
STOP_AFTER_FAILURE_S = 5.0


def _stop_link(lctx, timeout_s: float) -> None:
    """Close the link, waiting at most ``timeout_s`` (the process ends soon after anyway)."""

    def stop() -> None:
        try:
            lctx.stop_link()
        except Exception:  # noqa: BLE001,S110 - the link may already be gone
            pass

    closer = threading.Thread(target=stop, daemon=True, name="spu-link-stop")
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        log.warning("SPU's link did not close within %.0f s; leaving it", timeout_s)


def execute(
    spec: JobSpec,
    party: str,
    call: PsiCall,
    env: dict[str, str],
    session: str,
    keep: list | None = None,
) -> dict:
    """Create the blackbox link through the broker and run the spec's PSI call.

    Returns ``{"original_count", "intersection_count", "link_s", "psi_s"}``; raises CallFailed.
    Runs wherever the backend puts it, so it takes only picklable arguments. ``keep``: a list
    that keeps the closed link (see ``embedded``) instead of dropping it here."""
    from spu import psi as spu_psi

    # SPU's scratch folder (sorted input, bucket stores, intersection indices) and its sort's
    # spill files go to TMPDIR: make that the run's private work folder, removed at the end.
    os.environ["TMPDIR"] = str(call.scratch or call.output_path.parent)
    t0 = time.monotonic()
    try:
        lctx = create_blackbox_link(spec.link, spec.party_names, party, session, env)
        # SPU's PSI calls ConnectToMesh again on this connected link. yacl's connect test
        # message always has the same key and sequence number 0, and a second one that
        # arrives while the first is still unread is dropped without a word: both sides then
        # wait until the receive timeout (seen here in 1 of 3 Ray runs). A barrier first
        # makes sure both sides have read the first test message before either sends again.
        lctx.barrier()
    except Exception as exc:
        raise CallFailed("creating the SPU link", str(exc)) from exc
    t1 = time.monotonic()
    try:
        if spec.api == "psi_csv":
            report = spu_psi.bucket_psi(lctx, v1_config(spec, party, call))
        else:
            report = spu_psi.psi(v2_config(spec, party, call), lctx)
    except Exception as exc:
        _stop_link(lctx, STOP_AFTER_FAILURE_S)
        raise CallFailed("running the PSI", str(exc)) from exc
    _stop_link(lctx, STOP_AFTER_SUCCESS_S)
    if keep is not None:
        keep.append(lctx)
    return {
        "original_count": int(report.original_count),
        # A party that does not receive the result gets -1 from SPU.
        "intersection_count": int(report.intersection_count),
        "link_s": t1 - t0,
        "psi_s": time.monotonic() - t1,
    }
