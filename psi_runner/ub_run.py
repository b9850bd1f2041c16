"""The unbalanced PSI stages of a run (``protocol: ECDH_OPRF_UB``), called from ``job``.

* ``offline``: the server's ``--offline`` run after its preflight: the canonical key file, SPU's
  cache built from it in a new folder, the manifest, the swap (``cache.Build``).
* ``offer``: what this side tells the peer of its cache in the handshake (codes and an id only).
* ``prepare``: the online job's SPU call: the client's canonical key file and its copy of the
  cache (or where a fresh copy is received), the server's cache folder.

Both sides always give SPU canonical keys (``data.write_spu_input``): the server's cache holds
the keys as they were given to SPU when it was built, so the client's must be in the same form
whatever its file looks like.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import cache, checkpoint, data, report, unbalanced
from .backends.calls import PsiCall
from .backends.ub import UbPsiCall, gen_cache
from .errors import PreflightError

if TYPE_CHECKING:
    from .job import JobRun

log = logging.getLogger("psi_runner.ub_run")


def check_offline(run: JobRun) -> None:
    """``--offline`` is the server's alone, for an unbalanced spec."""
    spec, party = run.spec, run.party
    ub = spec.unbalanced
    if ub is None:
        raise PreflightError(
            f"--offline only applies to protocol {unbalanced.PROTOCOL} (this spec has protocol: "
            f"{spec.protocol}); run without --offline"
        )
    if party in spec.parties and party != ub.server:
        raise PreflightError(
            f"--offline builds the cache of the unbalanced server {ub.server}; {party} (the "
            "client) receives its copy in its first online job: run without --offline"
        )


def _keys_digest(spec, inp: data.InputTable) -> str:
    return checkpoint.keys_digest(inp.key_table(spec.keys))


def offline(run: JobRun, inp: data.InputTable, started: float) -> dict:
    """Build the server's cache from its checked input; the report."""
    spec, party = run.spec, run.party
    assert spec.unbalanced is not None and run.work is not None
    folder = spec.unbalanced.cache[party]
    cache.check_replaceable(folder, "server")
    t = time.monotonic()
    key_file = run.work / "spu_input.csv"
    data.write_spu_input(inp, spec.keys, key_file)
    digest = _keys_digest(spec, inp)
    data.release_memory()
    call = PsiCall(key_file, run.work / "spu_output.csv", (data.KEY_COLUMN,), scratch=run.work)
    run.progress(f"building {party}'s unbalanced cache from {inp.rows:,} rows")
    with cache.Build(folder) as build, cache.private_umask():
        rows = gen_cache(spec, party, call, build.spu_folder)
        doc = build.install(
            {
                "role": "server",
                "party": party,
                "id": cache.new_id(),
                "curve": cache.CURVE,
                "fields": unbalanced.fields(spec),
                "keys_digest": digest,
                "rows": rows,
            }
        )
    run.seconds["offline_s"] = time.monotonic() - t
    run.seconds["total_s"] = time.monotonic() - started
    log.info("%s: cache %s built at %s (%d rows)", run.tag, doc["id"], folder, rows)
    run.progress(f"cache {doc['id']} of {rows:,} rows is in {folder}")
    return {
        **report.offline_report(spec, party, inp.rows, run.log_path, run.seconds),
        "cache": {
            "folder": str(folder),
            "id": doc["id"],
            "rows": rows,
            "created": doc["created"],
        },
    }


def offer(run: JobRun, inp: data.InputTable) -> tuple[dict, str]:
    """This side's cache offer for the handshake and the local detail of its problem."""
    spec, party = run.spec, run.party
    ub = spec.unbalanced
    assert ub is not None
    folder = ub.cache[party]
    if party == ub.server:
        found = cache.check_server(folder, unbalanced.fields(spec), _keys_digest(spec, inp))
        doc = found.manifest or {}
        mine = {"role": "server", "problem": found.problem}
        if not found.problem:
            mine.update(id=doc.get("id", ""), rows=doc.get("rows", -1))
        return mine, found.detail
    found = cache.read(folder, "client")
    if found.problem == "foreign":
        return {"role": "client", "problem": "foreign"}, found.detail
    doc = found.manifest or {}
    holds = "" if found.problem else str(doc.get("id", ""))
    if doc.get("server") != ub.server:
        holds = ""
    return {"role": "client", "holds": holds, "problem": ""}, ""


def prepare(run: JobRun, inp: data.InputTable, folder: Path, out: Path) -> UbPsiCall:
    """The online call of this side."""
    spec, party = run.spec, run.party
    ub, plan = spec.unbalanced, run.ub_plan
    assert ub is not None and plan is not None
    home = ub.cache[party]
    if party == ub.server:
        # SPU reads only the cache: its sorted copy of the keys, its key and evaluated keys.
        return UbPsiCall(folder / "spu_input.csv", out, (data.KEY_COLUMN,), scratch=folder,
                         cache=home / cache.SPU_FOLDER, transfer=plan.transfer)  # fmt: skip
    inp.plain = False
    data.write_spu_input(inp, spec.keys, folder / "spu_input.csv")
    data.release_memory()
    call = UbPsiCall(folder / "spu_input.csv", out, (data.KEY_COLUMN,), scratch=folder,
                     cache=home / cache.SPU_FOLDER, transfer=plan.transfer)  # fmt: skip
    if plan.transfer:
        if plan.rows >= 0:
            run.progress(
                f"{party} holds no copy of {ub.server}'s cache {plan.cache_id}: {ub.server} "
                f"sends it first ({plan.rows:,} rows, about {36 * plan.rows / 1e6:,.0f} MB)"
            )
        build = cache.Build(home).__enter__()
        run.cleanups.append(lambda: build.__exit__(None, None, None))
        call.cache = build.spu_folder

        def keep(rows: int) -> Path:
            manifest = {"role": "client", "party": party, "server": ub.server,
                        "id": plan.cache_id, "rows": rows}  # fmt: skip
            build.install(manifest)
            run.progress(f"{party} keeps its copy of {ub.server}'s cache in {home}")
            return home / cache.SPU_FOLDER

        call.on_transferred = keep
    return call
