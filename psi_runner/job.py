"""One party's run of a job: preflight, PSI through the broker, result file, report."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from collections.abc import Callable

from . import __version__, broker_client, data, handshake, interrupts, rayhead
from .backends import embedded
from .backends.calls import PsiCall
from .errors import PeerError, PreflightError, PsiRunError
from .link import blackbox_environment
from .spec import JobSpec
from .watchdog import JobWatchdog

log = logging.getLogger("psi_runner.job")

EXIT_INTERRUPTED = 130


def preflight(spec: JobSpec, party: str) -> data.InputTable:
    """Local checks, before any network activity."""
    if party not in spec.parties:
        raise PreflightError(
            f"--party {party!r} is not in the spec; the parties are {', '.join(spec.parties)}"
        )
    me = spec.parties[party]
    inp = data.inspect_input(me.input, spec.keys, spec.allow_duplicate_keys)
    data.check_output_location(me.output)
    return inp


def backend_runner(spec: JobSpec) -> Callable[..., int]:
    if spec.backend == "embedded":
        return embedded.run
    from .backends import sf_backend

    return sf_backend.run


def remove_stale_work_dirs(folder: Path, party: str) -> list[Path]:
    """Delete work folders left by runs of ``party`` that were killed (their process is gone)."""
    removed = []
    for path in folder.glob(f".psi-run-{party}-*-*"):
        pid_text = path.name[len(f".psi-run-{party}-"):].split("-", 1)[0]
        if not pid_text.isdigit() or not path.is_dir():
            continue
        try:
            os.kill(int(pid_text), 0)
            continue  # that run is still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, under another user
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log.info("removed the work folder of a killed earlier run: %s", path)
    return removed


def run_job(spec: JobSpec, party: str, log_path: Path, check_only: bool = False,
            progress: Callable[[str], None] = lambda line: None,
            abort: Callable[..., None] | None = None) -> dict:
    """Run this party's side of the job; return the report (raises PsiRunError).

    With ``check_only`` it stops after preflight and the handshake (a dry run)."""
    stages: dict[str, float] = {}
    started = time.monotonic()
    log.info("job %s party %s: psi-run %s, spec %s", spec.job_id, party, __version__, spec.path)
    for warning in spec.link.warnings():
        log.warning("job %s party %s: %s", spec.job_id, party, warning)

    t = time.monotonic()
    inp = preflight(spec, party)
    me = spec.parties[party]
    broker_client.check_broker(me.broker, party)
    if spec.backend == "ray":
        rayhead.check_head(party, me.ray_address)  # type: ignore[arg-type]
    stages["preflight_s"] = time.monotonic() - t
    log.info("job %s party %s: input has %d rows, plain=%s", spec.job_id, party, inp.rows,
             inp.plain)

    t = time.monotonic()
    try:
        agreed = handshake.handshake(spec, party, spec.timeout_s,
                                     mode="check" if check_only else "run", progress=progress)
    finally:
        handshake.finish(spec, party)
    stages["handshake_s"] = time.monotonic() - t
    base = {"job_id": spec.job_id, "party": party, "peer": spec.peer_of(party),
            "backend": spec.backend, "api": spec.api, "protocol": spec.protocol,
            "join": spec.join, "keys": list(spec.keys), "receiver": spec.receiver,
            "original_count": inp.rows}
    if check_only:
        stages["total_s"] = time.monotonic() - started
        return {**base, "check": "ok", "peer_versions": agreed.peer_versions,
                "log": str(log_path), "seconds": {k: round(v, 3) for k, v in stages.items()}}

    remove_stale_work_dirs(me.output.parent, party)
    work = Path(tempfile.mkdtemp(prefix=f".psi-run-{party}-{os.getpid()}-",
                                 dir=me.output.parent))
    session = agreed.session
    try:
        t = time.monotonic()
        if inp.plain:
            call = PsiCall(me.input, work / "spu_output.csv", spec.keys)
        else:
            data.write_spu_input(inp, spec.keys, work / "spu_input.csv")
            call = PsiCall(
                work / "spu_input.csv", work / "spu_output.csv", (data.KEY_COLUMN,)
            )
        stages["prepare_s"] = time.monotonic() - t

        env = blackbox_environment(me.broker, spec.party_names, session, trace_id=session)
        run_psi = backend_runner(spec)
        if abort is None:
            spu_count = run_psi(spec, party, call, env, session, stages)
        else:
            def stop_job(message: str, code: int = PeerError.exit_code) -> None:  # ends it all
                try:
                    shutil.rmtree(work, ignore_errors=True)
                    broker_client.release_session(me.broker, session, party)
                finally:
                    abort(message, code)

            with JobWatchdog(spec, party, agreed, stop_job) as watchdog:
                def on_ctrl_c() -> None:  # from the SIGINT thread, while SPU may be busy
                    watchdog.notify_failure(f"{party} was interrupted (Ctrl-C, SIGINT or SIGTERM)")
                    stop_job("interrupted; no result was written", EXIT_INTERRUPTED)

                interrupts.set_hook(on_ctrl_c)
                try:
                    spu_count = run_psi(spec, party, call, env, session, stages,
                                        watchdog=watchdog)
                except PsiRunError as exc:
                    watchdog.notify_failure(f"{party}: {exc}")
                    raise
                finally:
                    interrupts.set_hook(None)

        t = time.monotonic()
        receives = party == spec.receiver or spec.broadcast_result
        count = None
        if receives:
            final_tmp = work / "result.csv"
            if inp.plain:
                os.replace(call.output_path, final_tmp)
                count = data.count_csv_rows(final_tmp)
            else:
                rows = data.read_result_rows(call.output_path)
                count = data.write_result(inp, rows, final_tmp)
            os.replace(final_tmp, me.output)  # same folder: the result appears whole or not at all
        stages["output_s"] = time.monotonic() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
        broker_client.release_session(me.broker, session, party)
        if spec.backend != "embedded":
            from .backends.sf_backend import FED_SUFFIX

            broker_client.release_session(me.broker, session + FED_SUFFIX, party)
        handshake.finish(spec, party)

    stages["total_s"] = time.monotonic() - started
    if spec.join != "inner":
        # SPU's count is the size of the intersection; the file holds the joined rows.
        extra = {"intersection_count": spu_count if spu_count >= 0 else None,
                 "output_rows": count}
    else:
        extra = {"intersection_count": count}
    return {
        **base,
        **extra,
        "output": str(me.output) if count is not None else None,
        "log": str(log_path),
        "seconds": {k: round(v, 3) for k, v in stages.items()},
    }
