"""``psi-run SPEC --party NAME``: run one party's side of a PSI job.

stdout carries only the JSON report; stderr carries one line per failure (never a traceback)
and the path of the detailed log. The job runs in a child process so that even a crash of
SPU's C++ code (SIGABRT, SIGSEGV) ends in a readable line rather than a core dump message.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from .errors import PsiRunError

EXIT_INTERRUPTED = 130
EXIT_PEER = 4
EXIT_CRASH = 6
EXIT_INTERNAL = 1


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="psi-run",
        description="Run one party's side of a two-party PSI job described by a YAML spec.",
    )
    parser.add_argument("spec", help="job spec (YAML), the same file at both parties")
    parser.add_argument("--party", required=True, help="which party of the spec this is")
    parser.add_argument("--check", action="store_true",
                        help="dry run: preflight and the handshake with the peer, then stop")
    parser.add_argument("--log-dir", default="logs",
                        help="folder for the detailed log file (default: ./logs)")
    return parser.parse_args(argv)


def _log_path(args: argparse.Namespace) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    safe_party = "".join(c if c.isalnum() or c in "._-" else "_" for c in args.party)[:64]
    stem = Path(args.spec).stem
    return Path(args.log_dir).expanduser().resolve() / f"{stem}-{safe_party}-{stamp}-{os.getpid()}.log"


def _say(fd: int, text: str) -> None:
    try:
        os.write(fd, (text.rstrip("\n") + "\n").encode("utf-8", "replace"))
    except OSError:  # whoever started us stopped listening; the log file still has it
        pass


def _preload_spu() -> None:
    try:
        import spu.libspu.link  # noqa: F401
        import spu.psi  # noqa: F401
    except Exception:  # noqa: BLE001 - the real import reports any problem in context
        pass


def _preload_secretflow() -> None:
    try:
        import secretflow  # noqa: F401 - about 4 s; overlaps with preflight and the handshake
    except Exception:  # noqa: BLE001
        pass


def _die_with_parent(parent: int) -> None:
    """Linux: end the child when the parent is killed (even by SIGKILL), so no orphan runs on."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(EXIT_INTERRUPTED)


def _child(args: argparse.Namespace, log_path: Path, out_fd: int, err_fd: int,
           parent: int, pipe_w: int) -> int:
    """Runs in the child: all output (SPU's C++ side too) goes through the parent's log pump."""
    _die_with_parent(parent)
    from . import interrupts

    interrupts.start()  # before any other thread: they all inherit the blocked SIGINT
    os.dup2(pipe_w, 1)
    os.dup2(pipe_w, 2)
    os.close(pipe_w)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True,
    )
    log = logging.getLogger("psi_runner.cli")
    if not args.check:
        # SPU takes most of a second to import; do it while the spec, the input file and the
        # peer are being checked (the PSI's own `import spu` then finds it done).
        threading.Thread(target=_preload_spu, daemon=True, name="preload-spu").start()
    try:
        from .job import run_job
        from .spec import load_spec

        spec = load_spec(args.spec)
        if spec.backend != "embedded" and not args.check:
            threading.Thread(target=_preload_secretflow, daemon=True,
                             name="preload-secretflow").start()
        for warning in spec.link.warnings():
            _say(err_fd, f"psi-run: warning: {warning}")
        def abort(message: str, code: int = EXIT_PEER) -> None:  # from another thread
            try:
                log.error("%s", message)
                _say(err_fd, f"psi-run: {message}")
            finally:
                os._exit(code)  # whatever happened above, the job ends here (SPU may be busy)

        report = run_job(spec, args.party, log_path, check_only=args.check,
                         progress=lambda line: _say(err_fd, f"psi-run: {line}"), abort=abort)
    except PsiRunError as exc:
        log.error("%s", exc, exc_info=exc.__cause__ is not None)
        _say(err_fd, f"psi-run: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _say(err_fd, "psi-run: interrupted; no result was written")
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
        log.exception("unexpected error")
        _say(err_fd, f"psi-run: internal error ({type(exc).__name__}: {exc}); "
                     f"details in {log_path}")
        return EXIT_INTERNAL
    _say(out_fd, json.dumps(report, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    log_path = _log_path(args)
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"psi-run: cannot create log folder {log_path.parent} ({exc.strerror}); "
              "use --log-dir", file=sys.stderr)
        return 3
    sys.stdout.flush()
    sys.stderr.flush()
    print(f"psi-run: log file {log_path}", file=sys.stderr, flush=True)
    out_fd, err_fd = os.dup(1), os.dup(2)
    try:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        print(f"psi-run: cannot write the log file {log_path} ({exc.strerror}); use --log-dir",
              file=sys.stderr)
        return 3
    pipe_r, pipe_w = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = EXIT_INTERNAL
        try:
            os.close(pipe_r)
            os.close(log_fd)
            code = _child(args, log_path, out_fd, err_fd, parent, pipe_w)
        finally:
            os._exit(code)
    os.close(pipe_w)

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    status = _pump_until_exit(pid, pipe_r, log_fd)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        _say(err_fd, f"psi-run: the PSI engine crashed ({sig}); no result was written; the last "
                     f"lines of {log_path} say why")
        return EXIT_CRASH
    return os.WEXITSTATUS(status)


def _pump_until_exit(pid: int, pipe_r: int, log_fd: int) -> int:
    """Copy the child's output into the log (see logpump) until it exits; its wait status."""
    import select

    from .logpump import LogPump

    pump = LogPump(log_fd)
    status: int | None = None
    quiet_since: float | None = None
    while True:
        ready, _, _ = select.select([pipe_r], [], [], 0.2)
        if ready:
            data = os.read(pipe_r, 1 << 16)
            if not data:
                break  # every writer is gone
            pump.feed(data)
            quiet_since = None
        if status is None:
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
        if status is not None and not ready:
            # The child is gone and the pipe is quiet: a process it started may still hold
            # the pipe open; do not wait for that one for long.
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since > 0.5:
                break
    pump.close()
    os.close(pipe_r)
    os.close(log_fd)
    if status is None:
        _, status = os.waitpid(pid, 0)
    return status


if __name__ == "__main__":
    sys.exit(main())
