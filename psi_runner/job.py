"""One party's run of a job, as named stages.

    preflight → handshake → prepare → psi (link and PSI, under the watchdog) → agree → output
    → report

``agree`` is the result agreement check (``agreement``): both sides compare what SPU gave them
before either writes its result.

``JobRun`` owns what a run holds: its private work folder, its broker sessions, the watchdog
(the control channel during the PSI), the progress sink and the cleanup. Each stage is a method
that returns its result and raises ``PsiRunError``; ``_stage`` times every stage once and is
the one failure path (log, announce to the peer once). Cleanup runs once, on every path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numpy as np
import pyarrow as pa

from . import (
    __version__,
    agreement,
    broker_client,
    checkpoint,
    csv_io,
    data,
    database,
    handshake,
    interrupts,
    joblock,
    keycode,
    normalize,
    notice,
    prewarm,
    report,
    resources,
    shard_runs,
    shards,
    ub_run,
    unbalanced,
)
from .arrowbits import int64_array
from .backends import BackendResult, backend_for
from .backends import ub as ub_backend
from .backends.calls import PsiCall
from .checkpoint import NO_CHECKPOINT, Checkpoint
from .errors import BackendError, Interrupted, LinkLost, PsiRunError, ResultsDisagree, Stalled
from .events import Events
from .handshake import Agreement, new_nonce
from .link import blackbox_environment
from .preflight import preflight
from .progress import spu_stage_seconds
from .relink import LinkMeter
from .spec import JobSpec
from .stall import StallMeter
from .watchdog import JobWatchdog
from .workdir import create_work_dir, remove_work_dir

log = logging.getLogger("psi_runner.job")


class JobRun:
    """This party's side of one job; ``run()`` returns the report or raises ``PsiRunError``.

    ``fatal(exc)`` ends the process with ``exc``'s line and exit code; it is called from the
    watchdog's or the signal thread while the main thread may be inside SPU's C++ code.
    With ``check_only`` the run stops after the handshake (a dry run)."""

    def __init__(
        self,
        spec: JobSpec,
        party: str,
        log_path: Path,
        fatal: Callable[[PsiRunError], NoReturn],
        check_only: bool = False,
        progress: Callable[[str], None] = lambda line: None,
        events: Events | None = None,
        fresh: bool = False,
        offline: bool = False,
        relinks_left: int = 0,
    ) -> None:
        self.spec = spec
        self.party = party
        self.log_path = log_path
        self.fatal = fatal
        self.check_only = check_only
        self.progress = progress
        self.events = events or Events()
        self.fresh = fresh  # --fresh: never resume from a checkpoint
        self.checkpoint: Checkpoint | None = None  # set when this job can be resumed
        self.resume = False
        self._input_digest = ""
        self.nonce = new_nonce()  # this run's identity on the control channel
        self.peer_nonce = ""
        self.seconds: dict[str, float] = {}
        self.extra: dict[str, object] = {}  # report fields learned on the way
        self.work: Path | None = None
        self.sessions: list[str] = []  # link sessions whose queues our broker should drop
        self.sharded: shards.ShardedCall | None = None  # set by prepare when spec.shards > 1
        self.watchdog: JobWatchdog | None = None
        self.lock: joblock.JobLock | None = None  # held from preflight to cleanup
        self._talked = False  # the handshake began: our broker holds control messages
        self._announced = False
        self._cleaned = False
        self._lock = threading.Lock()
        self.offline = offline  # --offline: build the unbalanced server's cache, no peer
        self.relinks_left = relinks_left  # automatic restarts left for a link lost (relink)
        self.key_code = keycode.HEX  # how non-plain keys go to SPU: agreed in the handshake
        self.spu_result_rows: int | None = None  # data rows of SPU's result file, once read
        self.ub_plan: unbalanced.UbPlan | None = None  # an online unbalanced job's plan
        self.cleanups: list[Callable[[], None]] = []  # stage helpers' own, run at cleanup
        if offline:
            self._announced = True  # no peer takes part: a failure is told to nobody

    @property
    def tag(self) -> str:
        return f"job {self.spec.job_id} party {self.party}"

    def run(self) -> dict:
        """Run every stage; the report."""
        started = time.monotonic()
        log.info("%s: psi-run %s, spec %s", self.tag, __version__, self.spec.path)
        for warning in self.spec.link.warnings():
            log.warning("%s: %s", self.tag, warning)
        warm = None if self.check_only or self.spec.backend != "embedded" else prewarm.start()
        data.use_system_allocator()  # Arrow's freed memory leaves RSS before SPU's fork
        try:
            with self._stage("preflight"):
                if self.offline:
                    ub_run.check_offline(self)
                inp = preflight(self.spec, self.party, take_lock=self._take_lock,
                                check_broker=not self.offline)  # fmt: skip
                self.events.emit("input", rows=inp.rows)
            log.info("%s: input has %d rows, plain=%s", self.tag, inp.rows, inp.plain)
            self._check_resources(inp)
            self._tell_normalized(inp)
            if self.offline:
                with self._stage("offline"):
                    return ub_run.offline(self, inp, started)
            with self._stage("handshake"):
                agreed = self._handshake(inp)
            if self.check_only:
                self.seconds["total_s"] = time.monotonic() - started
                return report.check_report(
                    self.spec,
                    self.party,
                    inp.rows,
                    agreed.peer_versions,
                    self.log_path,
                    self.seconds,
                )
            with self._stage("prepare"):
                call = self._prepare(inp, agreed)
            prewarm.wait(warm)
            with self._stage("psi", timed=False):
                result = self._psi(call, agreed)
            data.release_memory()  # SPU's, before the result stage allocates its own
            self.seconds.update(result.seconds)
            with self._stage("agree"):
                positions = self._agree(inp, call, result, agreed)
            with self._stage("output"):
                rows = self._output(inp, call, positions)
                self._done()
        finally:
            self._cleanup()
        self.seconds["total_s"] = time.monotonic() - started
        me = self.spec.parties[self.party]
        return report.job_report(
            self.spec,
            self.party,
            inp.rows,
            result.intersection_count,
            rows,
            me.output if rows is not None else None,
            self.log_path,
            self.seconds,
            self.extra,
        )

    @contextmanager
    def _stage(self, name: str, timed: bool = True) -> Iterator[None]:
        """Time a stage (``<name>_s``); on failure log it and tell the peer (once)."""
        t = time.monotonic()
        self.events.emit("stage", stage=name, state="start")
        try:
            yield
        except KeyboardInterrupt:
            exc = Interrupted("interrupted; no result was written")
            self._failed(name, exc)
            raise exc from None
        except LinkLost as exc:  # the peer's link was lost: start again, or end here
            ends = self._relink_or_end(exc)
            self._failed(name, ends)
            if ends is exc:
                raise
            raise ends from None
        except BaseException as exc:
            self._failed(name, exc)
            raise
        seconds = time.monotonic() - t
        if timed:
            self.seconds[f"{name}_s"] = seconds
        self.events.emit("stage", stage=name, state="done", seconds=round(seconds, 3))

    def _failed(self, stage: str, exc: BaseException) -> None:
        log.info("%s: stage %s failed: %s", self.tag, stage, exc)
        if (
            stage == "psi"
            and self.resume
            and isinstance(exc, BackendError)
            and not isinstance(exc, LinkLost)
        ):
            # SPU failed on the resumed checkpoint: the next run must not try it again.
            assert self.checkpoint is not None
            self.checkpoint.remove()
            self.progress("the checkpoint was removed: the next run starts from the beginning")
        if isinstance(exc, ResultsDisagree) and self.checkpoint is not None:
            # SPU's checkpoint holds the answer that disagreed: the next run computes anew.
            self.checkpoint.remove()
        self.events.emit("stage", stage=stage, state="failed")
        self._announce(stage, exc)

    # -- stages ------------------------------------------------------------------------

    def _take_lock(self) -> Path:
        """The job's lock, then this run's private work folder (a database input is spooled
        there during preflight)."""
        self.lock = joblock.JobLock.acquire(self.spec, self.party, self.nonce)
        self.work = create_work_dir(self.spec.parties[self.party].local_folder, self.party)
        return self.work

    def _tell_normalized(self, inp: data.InputTable) -> None:
        """What normalisation did, per key column: counts only, never values."""
        done = inp.normalized
        if done is None:
            return
        self.extra["normalize"] = {k: s.as_dict() for k, s in done.stats.items()}
        self.extra["rows_used"] = done.keys.num_rows
        for key, s in done.stats.items():
            dropped = " (dropped)" if done.dropped else ""
            self.progress(
                f"normalize {key[:40]}: {s.changed:,} of {inp.rows:,} rows changed, "
                f"{s.empty:,} empty, {s.invalid:,} invalid{dropped}"
            )
        if done.dropped:
            self.progress(f"normalize: {done.dropped:,} rows left out (on_invalid: drop)")

    def _check_resources(self, inp: data.InputTable) -> None:
        """Warn, one line each, when this machine lacks the disk or memory the job needs."""
        if self.work is None:
            return
        needs = resources.estimate(inp)
        log.info("%s: estimated needs: %d bytes of disk, %d of memory", self.tag, needs.disk,
                 needs.memory)  # fmt: skip
        for warning in resources.check(needs, self.work):
            log.warning("%s: %s", self.tag, warning)
            self.progress(f"warning: {warning}")

    def _handshake(self, inp: data.InputTable) -> Agreement:
        mode = "check" if self.check_only else "run"
        mine = self._checkpoint_offer(inp)
        ub_offer, ub_detail = ub_run.offer(self, inp) if self.spec.unbalanced else ({}, "")
        self._talked = True
        agreed = handshake.handshake(
            self.spec,
            self.party,
            self.spec.timeout_s,
            mode=mode,
            progress=self.progress,
            nonce=self.nonce,
            checkpoint=mine,
            extra_fields=normalize.handshake_fields(self.spec, inp.plan) if inp.plan else None,
            keys_form=data.keys_form(inp),
            cache=ub_offer,
            key_codes=keycode.CODES,
            digest_forms=agreement.digest_forms(self.party),
        )
        self.peer_nonce = agreed.peer_nonce
        self.events.emit("met", nonce=self.nonce, peer_nonce=agreed.peer_nonce)
        if self.spec.unbalanced:  # before any SPU link: both refuse an unusable cache alike
            theirs = agreed.peer_cache or {}
            self.ub_plan = unbalanced.agree(self.spec, self.party, ub_offer, theirs, ub_detail)
        self.key_code = self._key_code(agreed)
        self._agree_on_resume(mine, agreed.peer_checkpoint or {}, self.key_code)
        return agreed

    def _key_code(self, agreed: Agreement) -> str:
        """How non-plain keys are written for SPU (``keycode``): the same at both parties.
        Shards and unbalanced PSI keep ``hex`` (their files and caches are built with it)."""
        if self.spec.unbalanced or self.spec.shards > 1:
            return keycode.HEX
        return keycode.agreed_code(self.spec.keys, agreed.peer_key_codes)

    def _checkpoint_offer(self, inp: data.InputTable) -> dict:
        """What we tell the peer about our checkpoint: the joint run it belongs to, or why
        there is none to resume (words only, no data)."""
        if self.check_only or not checkpoint.supported(self.spec):
            return {}
        self.checkpoint = Checkpoint.of(self.spec, self.party)
        source = self.spec.parties[self.party].input
        if isinstance(inp.source, csv_io.CsvSource) and inp.source.digest is not None:
            self._input_digest = inp.source.digest  # taken by the preflight, one read
        elif isinstance(source, Path):
            self._input_digest = checkpoint.input_digest(source)
        else:
            self._input_digest = checkpoint.keys_digest(inp.key_table(self.spec.keys))
        if inp.plan is not None and inp.plan.salt is not None:
            # Another salt gives other keys from the same file: a checkpoint of its own.
            fp = normalize.salt_fingerprint(self.spec.job_id, inp.plan.salt)
            self._input_digest += f":salt-{fp}"
        if self.fresh:
            self.checkpoint.remove()
            return {"run": "", "why": "was started with --fresh"}
        why = self.checkpoint.matches(self.spec, self._input_digest)
        found = self.checkpoint.identity() or {}
        return {"run": "" if why else str(found.get("run", "")), "why": why}

    def _agree_on_resume(self, mine: dict, theirs: dict, code: str) -> None:
        """Resume only when both sides hold a checkpoint of the same joint run, whose keys
        were written with the key code this attempt uses (a peer upgraded since: not)."""
        if self.checkpoint is None:
            return
        run = mine.get("run", "")
        found = self.checkpoint.identity() or {}
        same_code = found.get("key_code", keycode.HEX) == code
        self.resume = bool(run) and run == theirs.get("run") and same_code
        if self.resume:
            self.progress("resuming from the checkpoint of an earlier attempt")
            return
        for who, offer in ((self.party, mine), (self.peer(), theirs)):
            why = offer.get("why")
            if isinstance(why, str) and why and why != NO_CHECKPOINT:
                self.progress(f"starting from the beginning: {who} {why[:80]}")
                return
        if run or theirs.get("run"):  # both have one, but of different attempts
            self.progress("starting from the beginning: the checkpoints are of other attempts")

    def peer(self) -> str:
        return self.spec.peer_of(self.party)

    def _prepare(self, inp: data.InputTable, agreed: Agreement) -> PsiCall:
        """SPU's input: the user's file as it is when SPU reads it right, else canonical keys.

        A resumable job keeps SPU's files in its checkpoint folder, at paths that stay the
        same from one attempt to the next (SPU refuses to resume otherwise)."""
        assert self.work is not None  # created with the lock, in preflight
        folder, recovery = self.work, None
        if self.checkpoint is not None:
            if not self.resume:
                self.checkpoint.start(self.spec, self._input_digest, run=agreed.session,
                                      key_code=self.key_code)  # fmt: skip
            folder, recovery = self.checkpoint.folder, self.checkpoint.spu_folder
        out = folder / "spu_output.csv"
        if inp.plain and inp.keys_quoted and agreed.peer_keys_form != "quoted":
            # SPU orders rows by the key's raw text: quoted here, bare there would misalign
            log.info("%s: canonical keys: the peer's keys are not quoted alike", self.tag)
            inp.plain = False
            inp.load_keys(self.spec.keys)  # the preflight proved them plain without holding them
        if self.spec.unbalanced:
            return ub_run.prepare(self, inp, folder, out)
        if self.spec.shards > 1:
            key = shards.shard_key(agreed.nonce, agreed.peer_nonce)
            self.sharded = shards.split(inp, self.spec, self.party, folder, key, out)
            if inp.plain:
                inp.release()
            data.release_memory()
            return self.sharded.whole
        if inp.plain:
            assert isinstance(inp.path, Path)
            inp.release()  # SPU's output is the result: our copy of the rows is not needed
            return PsiCall(inp.path, out, self.spec.keys,
                           scratch=folder, recovery_folder=recovery)  # fmt: skip
        presort = "stable" if self.spec.allow_duplicate_keys else "fast"
        if inp.keys_in_file:
            log.info("%s: plain keys go to SPU in key order, read again from the input", self.tag)
        data.write_spu_input(inp, self.spec.keys, folder / "spu_input.csv", self.key_code, presort)
        if self._keys_decode(inp):
            inp.drop_keys()
            log.info("%s: keys dropped while SPU runs; the result check reads them back from "
                     "SPU's output", self.tag)  # fmt: skip
        else:
            inp.spill(self.work)  # the keys wait on disk while SPU runs; Arrow gives memory back
        return PsiCall(folder / "spu_input.csv", out, (data.KEY_COLUMN,),
                       scratch=folder, recovery_folder=recovery)  # fmt: skip

    def _psi(self, call: PsiCall, agreed: Agreement) -> BackendResult:
        """The backend's link and PSI, watched: a dead peer or broker, or Ctrl-C, ends it."""
        spec, me = self.spec, self.spec.parties[self.party]
        backend = ub_backend if spec.unbalanced else backend_for(spec.backend)
        self.sessions = [agreed.session, *backend.extra_sessions(agreed.session)]
        if self.sharded is not None:
            self.sessions = [agreed.session, *shard_runs.sessions(agreed.session, spec.shards)]
        env = blackbox_environment(
            me.broker, spec.party_names, agreed.session, trace_id=agreed.session
        )
        client = broker_client.BrokerClient(me.broker)
        traffic_before = self._traffic(client)
        log_offset = self._log_size()
        watched = self.sessions[1:] if self.sharded is not None else agreed.session
        stall = StallMeter(self.log_path, me.broker, watched)
        watchdog = JobWatchdog(
            spec,
            self.party,
            agreed,
            self._stopped_by_watchdog,
            stall=stall,
            stall_timeout_s=spec.stall_timeout_s,
            link=LinkMeter(me.broker, self.sessions, self.log_path),
        )
        with watchdog as self.watchdog:
            interrupts.set_hook(self._interrupted)
            try:
                if self.sharded is not None:
                    result, told = shard_runs.run(spec, self.party, self.sharded, agreed.session)
                    self.extra.update(told)
                else:
                    result = backend.run(spec, self.party, call, env, agreed.session)
            finally:
                interrupts.set_hook(None)
        traffic_after = self._traffic(client)
        if traffic_before is not None and traffic_after is not None:
            sent, received = (a - b for a, b in zip(traffic_after, traffic_before))
            self.extra["bytes"] = {"sent": sent, "received": received}
        self.extra["spu_stages_s"] = self._spu_stages(log_offset)
        return result

    def _traffic(self, client: broker_client.BrokerClient) -> tuple[int, int] | None:
        try:
            return client.traffic(self.spec.peer_of(self.party))
        except (OSError, ValueError):
            return None

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return 0

    def _spu_stages(self, offset: int) -> dict[str, float]:
        """SPU's stage timings, read back from this run's log (written by the log pump, which
        copies each line as soon as SPU prints it)."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(offset)
                return spu_stage_seconds(fh.read(16 << 20))
        except OSError:
            return {}

    def _receives(self) -> bool:
        return self.party == self.spec.receiver or self.spec.broadcast_result

    def _keys_decode(self, inp: data.InputTable) -> bool:
        """SPU's input holds this run's canonical keys in a code that decodes back to the
        values (one key column, ``escape``), and the input can be read again for the result:
        the run keeps no copy of the keys while SPU runs."""
        decodes = self.key_code == keycode.ESCAPE or inp.keys_in_file  # plain: as they are
        return len(self.spec.keys) == 1 and decodes and inp.source is not None

    def _agree(
        self, inp: data.InputTable, call: PsiCall, result: BackendResult, agreed: Agreement
    ) -> np.ndarray | None:
        """Compare this side's result with the peer's before either publishes it; the result's
        positions in SPU's input (None for a file SPU read as it is)."""
        spec = self.spec
        spu_count = result.intersection_count if result.intersection_count >= 0 else None
        positions, keys = None, None
        if self._receives() and inp.plain:
            keys = data.read_result_keys(call.output_path, spec.keys)
            self.spu_result_rows = keys.num_rows  # the output need not count them again
        elif self._receives() and self._keys_decode(inp) and spec.join == "inner":
            as_text = agreement.SPU_TEXT in (agreed.peer_digest_forms or ())
            as_text = as_text and bool(agreement.digest_forms(self.party))
            as_text = as_text or inp.keys_in_file  # plain keys: the texts are the values
            log.info("%s: the result check digests the keys %s", self.tag,
                     "as SPU compared them" if as_text else "decoded from SPU's texts")  # fmt: skip
            positions, values = data.read_result_rows_and_values(call.output_path, as_text)
            keys = pa.table({spec.keys[0]: values})
        elif self._receives():
            positions = data.read_result_rows(call.output_path)
        if agreement.test_drop_requested(self.party):  # test-only: a row lost on one side
            log.warning("%s: %s is set: dropping a result row", self.tag, agreement.TEST_DROP_ENV)
            keys = keys.slice(0, max(keys.num_rows - 1, 0)) if keys is not None else None
            positions = positions[:-1] if positions is not None else None
        rows = keys.num_rows if keys is not None else None
        rows = len(positions) if positions is not None else rows
        digest = None
        if spec.join == "inner" and rows is not None:
            if keys is None:
                assert positions is not None
                keys = inp.key_table(spec.keys).take(int64_array(positions))
            key = agreement.digest_key(agreed.nonce, agreed.peer_nonce)
            digest = agreement.keys_digest([keys[k] for k in spec.keys], key)
        count = rows if spec.join == "inner" and rows is not None else spu_count
        mine = agreement.Summary(count, rows, digest)
        self.extra["agreement"] = agreement.check(spec, self.party, agreed, mine)
        log.info("%s: result check: %s", self.tag, self.extra["agreement"])
        return positions

    def _output(
        self, inp: data.InputTable, call: PsiCall, positions: np.ndarray | None
    ) -> int | None:
        """Move the result into place (whole or not at all); its rows, None if not received."""
        spec = self.spec
        if not self._receives():
            return None
        assert self.work is not None
        output = spec.parties[self.party].output
        if not isinstance(output, Path):  # a database table, swapped in by one transaction
            assert positions is not None
            table = data.result_table(inp, inp.input_rows(positions))
            database.write_output(output, table, f"output {output.describe()}")
            return table.num_rows
        final_tmp = self.work / ("result" + output.suffix)
        if inp.plain:
            os.replace(call.output_path, final_tmp)
            count = self.spu_result_rows
            if count is None:
                count = data.count_csv_rows(final_tmp)
        else:
            assert positions is not None
            count = data.write_result(inp, inp.input_rows(positions), final_tmp)
        os.replace(final_tmp, output)  # same folder: atomic
        return count

    def _done(self) -> None:
        """The job succeeded: its checkpoint is no longer needed."""
        if self.checkpoint is not None:
            self.checkpoint.remove()

    # -- failure and cleanup -----------------------------------------------------------

    def _announce(self, stage: str, exc: BaseException) -> None:
        """Tell the peer our side failed (once), so it stops now instead of at a timeout."""
        if getattr(exc, "from_peer", False) or self.party not in self.spec.parties:
            return
        with self._lock:
            if self._announced:
                return
            self._announced = True
        message = notice.failure_notice(self.party, stage, exc, self.nonce, self.peer_nonce)
        notice.send_notice(self.spec, self.party, message)

    def _stopped_by_watchdog(self, error: PsiRunError) -> None:
        """From the watchdog: the peer failed, the peer or our broker is gone, or the PSI
        stalled (the peer is told of a stall: it may not see it, e.g. when it is stopped)."""
        if isinstance(error, Stalled):
            self._announce("psi", error)
            self.events.emit("stalled", retries=self.spec.retries)
        if isinstance(error, LinkLost):
            error = self._relink_or_end(error)
            self._announce("psi", error)
        self._stop_now(error)

    def _relink_or_end(self, error: LinkLost) -> LinkLost:
        """A lost SPU link: ask the CLI to start the job again (once per occurrence), or, with
        no automatic restart left, the error that ends the job (its notice says so)."""
        if not error.restart:
            return error
        if self.relinks_left > 0:
            self.events.emit("relink")
            return error
        return LinkLost(
            f"{error}; no result was written (psi-run had already started the job again "
            "after this twice); run the job again",
            restart=False,
            from_peer=error.from_peer,
        )

    def _interrupted(self) -> None:
        """From the signal thread, during the PSI."""
        error = Interrupted("interrupted; no result was written")
        self._announce("psi", error)
        self._stop_now(error)

    def _stop_now(self, exc: PsiRunError) -> NoReturn:
        try:
            self._cleanup()
        finally:
            self.fatal(exc)

    def _cleanup(self) -> None:
        """Remove the work folder and drop our queues at our broker (once, on every path)."""
        with self._lock:
            if self._cleaned:
                return
            self._cleaned = True
        if self.watchdog is not None:
            self.watchdog.stop()
        for cleanup in self.cleanups:
            cleanup()
        remove_work_dir(self.work)
        if self.lock is not None:
            self.lock.release()
        if not self._talked:
            return
        for session in self.sessions:
            broker_client.release_session(self.spec.parties[self.party].broker, session, self.party)
        handshake.finish(self.spec, self.party)
