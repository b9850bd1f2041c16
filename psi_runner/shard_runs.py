"""Running a sharded job's K SPU PSIs at once, and merging their outputs (``shards``).

* ``embedded``: one process per shard (spawned, so that each has its own SPU link state and
  environment); each ends when the runner's process ends (``PR_SET_PDEATHSIG``).
* ``ray``: one task per shard in the party's Ray cluster, one CPU each, spread over its nodes
  (``SPREAD``); a task receives its part's bytes and returns its output's bytes, so a node
  needs no shared folder (it does need to reach the party's broker).

Each shard's PSI is the ordinary ``calls.execute`` on the link session ``shard_session(i)``.
The first shard to fail ends the others at once and fails the run with a line naming the
shard; the job's failure notice then ends the peer's run, whose shards end with it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.connection import wait
from pathlib import Path

from .backends import BackendResult
from .backends.calls import CallFailed, PsiCall, execute
from .backends.translate import translate_spu_error
from .errors import BackendError
from .link import blackbox_environment
from .shards import ShardedCall, ShardOutput, merge, shard_session
from .spec import JobSpec
from .supervisor import die_with_parent

log = logging.getLogger("psi_runner.shard_runs")

_KILL_GRACE_S = 2.0


def sessions(session: str, k: int) -> list[str]:
    return [shard_session(session, i) for i in range(k)]


def run(
    spec: JobSpec, party: str, sharded: ShardedCall, session: str
) -> tuple[BackendResult, dict]:
    """Run the K PSIs, merge this side's outputs into ``sharded.whole.output_path``; the
    result and what the report says of each shard (sizes, intersections, seconds, node)."""
    me = spec.parties[party]
    envs = [
        blackbox_environment(me.broker, spec.party_names, s, trace_id=s)
        for s in sessions(session, spec.shards)
    ]
    t = time.monotonic()
    if spec.backend == "ray":
        reports = _ray_tasks(spec, party, sharded, envs, session)
    else:
        reports = _processes(spec, party, sharded, envs, session)
    psi_s = time.monotonic() - t
    counts = [r["intersection_count"] for r in reports]
    total = sum(counts) if all(c >= 0 for c in counts) else -1
    info = [
        {
            "rows": rows,
            "intersection_count": c if c >= 0 else None,
            "psi_s": round(r["psi_s"], 3),
            **({"node": r["node"]} if "node" in r else {}),
        }
        for rows, c, r in zip(sharded.rows, counts, reports)
    ]
    t = time.monotonic()
    receives = party == spec.receiver or spec.broadcast_result
    if receives:
        outputs = [
            ShardOutput(p.output_path, rows, c)
            for p, rows, c in zip(sharded.parts, sharded.rows, counts)
        ]
        try:
            merge(spec, party, outputs, sharded.whole.output_path)
        except ValueError as exc:
            raise BackendError(f"job {spec.job_id}: merging the shards failed ({exc})") from exc
    # psi_s: from starting the shards to the last one's end; link_s: the slowest link
    seconds = {
        "link_s": max(r["link_s"] for r in reports),
        "psi_s": psi_s,
        "merge_s": time.monotonic() - t,
    }
    log.info("job %s party %s: %d shards done, %s", spec.job_id, party, spec.shards, info)
    return BackendResult(total, seconds), {"shards": info}


def _failed(spec: JobSpec, party: str, index: int, stage: str, text: str) -> BackendError:
    """A shard's failure as psi-run's error, naming the shard."""
    exc = translate_spu_error(CallFailed(stage, text), spec, party, stage)
    prefix = f"job {spec.job_id}: "
    body = str(exc)[len(prefix) :] if str(exc).startswith(prefix) else str(exc)
    err = type(exc)(f"{prefix}shard {index + 1} of {spec.shards}: {body}")
    return err  # type: ignore[return-value]


# -- embedded: one process per shard ---------------------------------------------------------


def _child(conn, spec: JobSpec, party: str, call: PsiCall, env: dict, session: str, ppid: int):
    die_with_parent(ppid, 1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner handles Ctrl-C for the job
    try:
        conn.send({"report": execute(spec, party, call, env, session)})
    except CallFailed as exc:
        conn.send({"error": str(exc), "stage": exc.stage})
    except BaseException as exc:  # noqa: BLE001 - handed to the runner as text
        conn.send({"error": f"{type(exc).__name__}: {exc}", "stage": "running the PSI"})
    finally:
        conn.close()


def _processes(
    spec: JobSpec, party: str, sharded: ShardedCall, envs: list[dict], session: str
) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    procs, readers = [], []
    try:
        for i, (part, env) in enumerate(zip(sharded.parts, envs)):
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child,
                args=(writer, spec, party, part, env, shard_session(session, i), os.getpid()),
                name=f"psi-shard{i}",
            )
            proc.start()
            writer.close()
            procs.append(proc)
            readers.append(reader)
        log.info(
            "job %s party %s: %d shard processes: %s",
            spec.job_id,
            party,
            len(procs),
            [p.pid for p in procs],
        )
        return _collect(spec, party, procs, readers)
    finally:
        _end(procs)


def _collect(spec: JobSpec, party: str, procs: list, readers: list) -> list[dict]:
    results: list[dict | None] = [None] * len(procs)
    waiting = {r: i for i, r in enumerate(readers)} | {p.sentinel: i for i, p in enumerate(procs)}
    while any(r is None for r in results):
        for ready in wait(list(waiting)):
            i = waiting.pop(ready)
            if ready is readers[i]:
                try:
                    msg = readers[i].recv()
                except (EOFError, OSError):
                    msg = None
                if msg is None:
                    continue  # the process's end (its sentinel) says what happened
                if "error" in msg:
                    raise _failed(spec, party, i, msg["stage"], msg["error"])
                results[i] = msg["report"]
            elif results[i] is None:
                procs[i].join(1)
                if readers[i] in waiting and readers[i].poll():
                    waiting[ready] = i  # its answer is still in the pipe: read it first
                    continue
                code = procs[i].exitcode
                how = f"was killed by signal {-code}" if code and code < 0 else f"exited ({code})"
                raise BackendError(
                    f"job {spec.job_id}: shard {i + 1} of {spec.shards}: its SPU process "
                    f"{how} without a result; see the log file"
                )
    return results  # type: ignore[return-value]


def _end(procs: list) -> None:
    """Stop every shard process still running (after a failure), within a bounded wait."""
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + _KILL_GRACE_S
    for p in alive:
        p.join(max(deadline - time.monotonic(), 0))
        if p.is_alive():
            p.kill()
            p.join(1)


# -- ray: one task per shard, spread over the party's cluster -------------------------------


def _ray_shard(spec: JobSpec, party: str, index: int, body: bytes, keys: tuple, env: dict,
               session: str) -> dict:  # fmt: skip
    """A Ray task: one shard's PSI in a private folder of the node it runs on."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    folder = Path(tempfile.mkdtemp(prefix=f"psi-run-{party}-shard{index}-"))
    try:
        os.chmod(folder, 0o700)
        part = folder / "spu_input.csv"
        part.write_bytes(body)
        del body
        call = PsiCall(part, folder / "spu_output.csv", keys, scratch=folder)
        try:
            report = execute(spec, party, call, env, session)
        except CallFailed as exc:
            return {"error": str(exc), "stage": exc.stage, "node": node}
        out = call.output_path.read_bytes() if call.output_path.exists() else b""
        return {"report": {**report, "node": node}, "output": out}
    except Exception as exc:  # noqa: BLE001 - handed to the runner as text
        return {"error": f"{type(exc).__name__}: {exc}", "stage": "running the PSI", "node": node}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _ray_tasks(
    spec: JobSpec, party: str, sharded: ShardedCall, envs: list[dict], session: str
) -> list[dict]:
    import ray

    if not ray.is_initialized():  # preflight has joined the cluster; join again if not
        ray.init(address=spec.parties[party].ray_address, log_to_driver=True,
                 logging_level="warning")  # fmt: skip
    task = ray.remote(num_cpus=1, max_calls=1, max_retries=0)(_ray_shard)
    refs = []
    for i, (part, env) in enumerate(zip(sharded.parts, envs)):
        body = part.input_path.read_bytes()
        refs.append(
            task.options(scheduling_strategy="SPREAD", name=f"psi-run-shard{i}").remote(
                spec, party, i, body, part.keys, env, shard_session(session, i)
            )
        )
        del body
    index = {ref: i for i, ref in enumerate(refs)}
    results: list[dict | None] = [None] * len(refs)
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                i = index[ref]
                try:
                    msg = ray.get(ref)
                except Exception as exc:  # a crashed worker, a lost node
                    first = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
                    raise BackendError(
                        f"job {spec.job_id}: shard {i + 1} of {spec.shards}: its Ray task "
                        f"failed ({first}); see the log file"
                    ) from exc
                if "error" in msg:
                    raise _failed(spec, party, i, msg["stage"], msg["error"])
                sharded.parts[i].output_path.write_bytes(msg["output"])
                results[i] = msg["report"]
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return results  # type: ignore[return-value]
