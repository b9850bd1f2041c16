"""SPU's unbalanced PSI calls (``spu.psi.ub_psi``, ECDH-OPRF), run in the runner's process.

* ``gen_cache``: the server's offline phase (``MODE_OFFLINE_GEN_CACHE``), no link: SPU reads
  the key file, evaluates every key under a fresh random OPRF key (kept in the cache) and writes
  the cache folder.
* ``run``: an online job over the blackbox link through the brokers: first, when the client
  holds no copy of this cache, ``MODE_OFFLINE_TRANSFER_CACHE`` (the server sends its evaluated
  keys, the client stores them; ``UbPsiCall.on_transferred`` keeps the copy even if the online
  phase then fails), then ``MODE_ONLINE`` (the client's blinded keys out and back, the client
  compares; the server learns the matches only when it receives the result).

SPU 0.9.3b0 writes the client's and the server's results sorted by key (aligned), and tells a
party that does not receive the result an intersection of 0, which is reported as -1 here.
Errors are translated at this boundary, as in the embedded backend.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import private_umask
from ..link import create_blackbox_link
from ..spec import JobSpec
from . import BackendResult
from .calls import STOP_AFTER_FAILURE_S, STOP_AFTER_SUCCESS_S, CallFailed, PsiCall, _stop_link
from .translate import translate_spu_error

log = logging.getLogger("psi_runner.backends.ub")


@dataclass
class UbPsiCall(PsiCall):
    """An online job's call: the PSI call's paths plus this party's side of the cache."""

    # server: its SPU cache folder; client: its copy's, or where a fresh copy is received
    cache: Path = Path()
    transfer: bool = False  # the client receives a copy of the cache first
    # client: keeps the copy received (rows sent) and says where it now is
    on_transferred: Callable[[int], Path] | None = field(default=None, repr=False)


def _config(spec: JobSpec, party: str, mode: str, call: PsiCall, cache: Path):
    from spu import psi_v2_pb2 as v2

    server = spec.unbalanced is not None and party == spec.unbalanced.server
    client = spec.peer_of(spec.unbalanced.server) if spec.unbalanced else party
    config = v2.UbPsiConfig(
        mode=v2.UbPsiConfig.Mode.Value(mode),
        role=v2.ROLE_SERVER if server else v2.ROLE_CLIENT,
        input_config=v2.IoConfig(type=v2.IO_TYPE_FILE_CSV, path=str(call.input_path)),
        keys=list(call.keys),
        cache_path=str(cache),
        output_config=v2.IoConfig(type=v2.IO_TYPE_FILE_CSV, path=str(call.output_path)),
        server_get_result=spec.broadcast_result or spec.receiver != client,
        client_get_result=spec.broadcast_result or spec.receiver == client,
    )
    config.debug_options.trace_path = str(call.output_path.parent / "spu.trace")
    return config


def extra_sessions(session: str) -> list[str]:
    """Only the SPU link, as the embedded backend."""
    return []


def gen_cache(spec: JobSpec, party: str, call: PsiCall, cache: Path) -> int:
    """The server's offline phase into the SPU cache folder ``cache``; the rows evaluated."""
    from spu import psi as spu_psi

    os.environ["TMPDIR"] = str(call.scratch or call.output_path.parent)
    try:
        report = spu_psi.ub_psi(_config(spec, party, "MODE_OFFLINE_GEN_CACHE", call, cache), None)
    except Exception as exc:
        log.error("building the cache failed: %s", exc)
        raise translate_spu_error(exc, spec, party, "building the unbalanced cache") from exc
    return int(report.original_count)


def run(
    spec: JobSpec, party: str, call: UbPsiCall, env: dict[str, str], session: str
) -> BackendResult:
    """An online job: create the link, send the client a copy of the cache when it needs one,
    then run the online phase."""
    try:
        with private_umask():  # SPU's cache files and result: 0600, not 0644
            report, seconds = _execute(spec, party, call, env, session)
    except CallFailed as exc:
        log.error("%s failed: %s", exc.stage, exc)
        raise translate_spu_error(exc, spec, party, exc.stage) from exc
    receives = spec.broadcast_result or spec.receiver == party
    count = int(report.intersection_count) if receives else -1
    log.info("job %s party %s: SPU ub report original=%d intersection=%d", spec.job_id, party,
             report.original_count, count)  # fmt: skip
    return BackendResult(count, seconds)


def _execute(
    spec: JobSpec, party: str, call: UbPsiCall, env: dict[str, str], session: str
) -> tuple[object, dict[str, float]]:
    from spu import psi as spu_psi

    os.environ["TMPDIR"] = str(call.scratch or call.output_path.parent)
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    try:
        lctx = create_blackbox_link(spec.link, spec.party_names, party, session, env)
        lctx.barrier()  # see calls.execute: SPU connects again on this link
    except Exception as exc:
        raise CallFailed("creating the SPU link", str(exc)) from exc
    seconds["link_s"] = time.monotonic() - t0
    stage = "sending the client a copy of the cache"
    try:
        cache = call.cache
        if call.transfer:
            t = time.monotonic()
            config = _config(spec, party, "MODE_OFFLINE_TRANSFER_CACHE", call, cache)
            sent = spu_psi.ub_psi(config, lctx)
            lctx.barrier()  # both sides have finished the transfer before the online phase
            seconds["transfer_s"] = time.monotonic() - t
            if call.on_transferred is not None:
                cache = call.on_transferred(int(sent.original_count))
        stage = "running the unbalanced PSI (online)"
        t = time.monotonic()
        report = spu_psi.ub_psi(_config(spec, party, "MODE_ONLINE", call, cache), lctx)
        seconds["psi_s"] = time.monotonic() - t
    except Exception as exc:
        _stop_link(lctx, STOP_AFTER_FAILURE_S)
        raise CallFailed(stage, str(exc)) from exc
    _stop_link(lctx, STOP_AFTER_SUCCESS_S)
    return report, seconds
