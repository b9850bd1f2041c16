"""The JSON report a run prints on stdout (see the README for every field)."""

from __future__ import annotations

from pathlib import Path

from .spec import JobSpec


def _common(spec: JobSpec, party: str, rows: int) -> dict:
    return {
        "job_id": spec.job_id,
        "party": party,
        "peer": spec.peer_of(party),
        "backend": spec.backend,
        "api": spec.api,
        "protocol": spec.protocol,
        "join": spec.join,
        "keys": list(spec.keys),
        "receiver": spec.receiver,
        "original_count": rows,
    }


def _seconds(seconds: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 3) for k, v in seconds.items()}


def check_report(
    spec: JobSpec,
    party: str,
    rows: int,
    peer_versions: dict[str, str],
    log_path: Path,
    seconds: dict[str, float],
) -> dict:
    """The report of a ``--check`` run."""
    return {
        **_common(spec, party, rows),
        "check": "ok",
        "peer_versions": peer_versions,
        "log": str(log_path),
        "seconds": _seconds(seconds),
    }


def offline_report(
    spec: JobSpec, party: str, rows: int, log_path: Path, seconds: dict[str, float]
) -> dict:
    """The report of an ``--offline`` run (the unbalanced server's cache build)."""
    return {
        **_common(spec, party, rows),
        "offline": "ok",
        "log": str(log_path),
        "seconds": _seconds(seconds),
    }


def job_report(
    spec: JobSpec,
    party: str,
    rows: int,
    spu_count: int,
    output_rows: int | None,
    output: Path | None,
    log_path: Path,
    seconds: dict[str, float],
    extra: dict[str, object] | None = None,
) -> dict:
    """The report of a finished job.

    ``spu_count`` is SPU's intersection size (-1 where SPU does not tell this party);
    ``output_rows`` the rows written to this party's result file (None: no result here)."""
    if spec.join != "inner":
        # SPU's count is the size of the intersection; the file holds the joined rows.
        counts = {
            "intersection_count": spu_count if spu_count >= 0 else None,
            "output_rows": output_rows,
        }
    else:
        counts = {"intersection_count": output_rows}
    return {
        **_common(spec, party, rows),
        **counts,
        "output": str(output) if output is not None else None,
        "log": str(log_path),
        "seconds": _seconds(seconds),
        **(extra or {}),
    }
