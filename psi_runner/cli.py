"""``psi-run SPEC --party NAME``: run one party's side of a PSI job.

stdout carries only the JSON report; stderr carries one line per failure (never a traceback)
and the path of the detailed log. The job itself runs in a child process (``supervisor``), so
that even a crash of SPU's C++ code ends in a readable line. This module parses the command
line, runs the job and maps an error to its exit code (declared in ``errors``).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import NoReturn

from .errors import EXIT_OK, EngineCrashed, Interrupted, PreflightError, PsiRunError, exit_codes
from .events import Events
from .progress import MODES, ProgressView
from .relink import RELINKS_MAX

log = logging.getLogger("psi_runner.cli")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in exit_codes())
    parser = argparse.ArgumentParser(
        prog="psi-run",
        description="Run one party's side of a two-party PSI job described by a YAML spec.",
        epilog=f"exit codes:\n{codes}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("spec", help="job spec (YAML), the same file at both parties")
    parser.add_argument("--party", required=True, help="which party of the spec this is")
    parser.add_argument(
        "--check",
        action="store_true",
        help="dry run: preflight and the handshake with the peer, then stop",
    )
    parser.add_argument(
        "--log-dir", default="logs", help="folder for the detailed log file (default: ./logs)"
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="start from the beginning even if both sides hold a checkpoint of an earlier "
        "attempt of this job",
    )
    parser.add_argument(
        "--offline",
        action="store_true",
        help="unbalanced PSI (protocol ECDH_OPRF_UB): build the server party's cache from its "
        "input, alone (no peer, no broker); online jobs then reuse it",
    )
    parser.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="progress on stderr: a live line on a terminal, else a line per stage and per "
        "10%% (auto, the default), always those lines (plain), JSON lines (json), or none",
    )
    args = parser.parse_args(argv)
    if args.offline and (args.check or args.fresh):
        parser.error("--offline builds a cache alone: it takes neither --check nor --fresh")
    return args


class Console:
    """The runner's two output streams: the JSON report (stdout) and one-line messages (stderr).

    Holds duplicates of the original descriptors, because in the job process fd 1 and 2 are
    the log pump's pipe."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.out_fd = os.dup(1)
        self.err_fd = os.dup(2)

    def say(self, text: str) -> None:
        """One line on stderr, prefixed ``psi-run:``."""
        _write(self.err_fd, f"psi-run: {text}")

    def report(self, report: dict) -> None:
        _write(self.out_fd, json.dumps(report, ensure_ascii=False))

    def fail(self, exc: PsiRunError) -> int:
        """Log and print ``exc``; its exit code."""
        log.error("%s", exc, exc_info=exc.__cause__ is not None)
        self.say(str(exc))
        return exc.exit_code

    def fatal(self, exc: PsiRunError) -> NoReturn:
        """End the job process now, from any thread (SPU's C++ code may hold the main one)."""
        code = exc.exit_code
        try:
            code = self.fail(exc)
        finally:
            os._exit(code)


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, (text.rstrip("\n") + "\n").encode("utf-8", "replace"))
    except OSError:  # whoever started us stopped listening; the log file still has it
        pass


def _log_path(args: argparse.Namespace) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe_party = "".join(c if c.isalnum() or c in "._-" else "_" for c in args.party)[:64]
    name = f"{Path(args.spec).stem}-{safe_party}-{stamp}-{os.getpid()}.log"
    return Path(args.log_dir).expanduser().resolve() / name


def _open_log(log_path: Path) -> int:
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PreflightError(
            f"cannot create log folder {log_path.parent} ({exc.strerror}); use --log-dir"
        ) from None
    try:
        return os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        raise PreflightError(
            f"cannot write the log file {log_path} ({exc.strerror}); use --log-dir"
        ) from None


def _preload(*modules: str) -> None:
    """Import heavy modules in a thread while the spec, input and peer are being checked."""

    def load() -> None:
        for name in modules:
            try:
                __import__(name)
            except Exception:  # noqa: BLE001 - the real import reports any problem in context
                return

    threading.Thread(target=load, daemon=True, name="preload").start()


def _job_process(
    args: argparse.Namespace, console: Console, events: Events, *, relinks_left: int = 0
) -> int:
    """The child: run the job; its exit code. All output goes through the log pump."""
    from . import interrupts

    interrupts.start()  # before any other thread: they all inherit the blocked SIGINT
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.check:
        _preload("spu.libspu.link", "spu.psi")  # most of a second; the PSI finds it done
    try:
        from .job import JobRun
        from .spec import load_spec

        spec = load_spec(args.spec)
        if spec.backend != "embedded" and not args.check:
            _preload("secretflow")  # about 4 s
        for warning in spec.link.warnings():
            console.say(f"warning: {warning}")
        run = JobRun(
            spec,
            args.party,
            console.log_path,
            check_only=args.check,
            progress=console.say,
            fatal=console.fatal,
            events=events,
            fresh=args.fresh,
            offline=args.offline,
            relinks_left=relinks_left,
        )
        report = run.run()
    except PsiRunError as exc:
        return console.fail(exc)
    except KeyboardInterrupt:
        return console.fail(Interrupted("interrupted; no result was written"))
    except Exception as exc:
        log.exception("unexpected error")
        console.say(f"internal error ({type(exc).__name__}: {exc}); details in {console.log_path}")
        return PsiRunError.exit_code
    console.report(report)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``psi-run``."""
    from .supervisor import run_supervised

    args = _parse_args(argv)
    log_path = _log_path(args)
    sys.stdout.flush()
    sys.stderr.flush()
    console = Console(log_path)
    try:
        log_fd = _open_log(log_path)
    except PsiRunError as exc:
        console.say(str(exc))
        return exc.exit_code
    console.say(f"log file {log_path}")
    attempt, stalls, relinks = 1, 0, 0
    while True:
        view = ProgressView(args.progress, console.err_fd)
        try:
            code = run_supervised(
                functools.partial(_job_process, args, console, relinks_left=RELINKS_MAX - relinks),
                log_fd if attempt == 1 else _open_log(log_path),
                on_event=view.on_event,
                on_line=view.on_line,
            )
        except EngineCrashed as exc:
            view.close()
            _tell_peer_of_crash(args, view, exc)
            console.say(f"{exc}; the last lines of {log_path} say why")
            return exc.exit_code
        except PsiRunError as exc:
            console.say(str(exc))
            return exc.exit_code
        finally:
            view.close()
        # Both sides saw it (or were told of it) and start again, with a new handshake.
        if view.relinked and relinks < RELINKS_MAX:
            relinks += 1
            attempt += 1
            console.say(
                "starting the job again: SPU's link did not reconnect after a broker restart "
                f"(automatic restart {relinks} of {RELINKS_MAX}, attempt {attempt})"
            )
        elif view.stalled_retries > stalls:
            stalls += 1
            attempt += 1
            console.say(f"starting the job again after the stall (attempt {attempt})")
        else:
            return code


def _tell_peer_of_crash(args: argparse.Namespace, view: ProgressView, exc: EngineCrashed) -> None:
    """The job process died without a word: tell the peer from here (best effort)."""
    from . import notice
    from .spec import load_spec

    if not view.stage:
        return  # it died before it knew its job
    try:
        spec = load_spec(args.spec)
        if args.party in spec.parties:
            message = notice.failure_notice(
                args.party, view.stage, exc, view.nonce, view.peer_nonce
            )
            notice.send_notice(spec, args.party, message)
    except PsiRunError:
        pass


if __name__ == "__main__":
    sys.exit(main())
