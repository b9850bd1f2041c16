"""Exception tree of psi-run; each branch declares the exit code it maps to (the only place).

    PsiRunError                 root; an unexpected failure (exit 1)
    ├── SpecError               the job spec is unreadable or invalid (exit 2)
    ├── PreflightError          local input, output or broker is not usable (exit 3)
    ├── PeerError               the peer did not appear, failed or runs a different job (exit 4)
    ├── BackendError            SPU/SecretFlow failed during the PSI (exit 5)
    ├── EngineCrashed           the job process died by a signal, e.g. SPU's SIGABRT (exit 6)
    └── Interrupted             Ctrl-C (SIGINT) or SIGTERM; no result was written (exit 130)

Only the CLI turns these into an exit code and a one-line message; ``EXIT_CODES`` lists them
for the README and ``psi-run --help``.
"""

from __future__ import annotations

EXIT_OK = 0


class PsiRunError(Exception):
    """Root of every error psi-run raises on purpose."""

    exit_code = 1
    meaning = "an unexpected failure (a bug; the log file has the traceback)"


class SpecError(PsiRunError):
    """The job spec cannot be used; ``problems`` lists every issue with its key path."""

    exit_code = 2
    meaning = "the job spec is invalid (every problem is listed with its key path)"

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{path}: {self.problems[0]}"
        else:
            text = f"{path}: {len(self.problems)} problems: " + "; ".join(self.problems)
        super().__init__(text)


class PreflightError(PsiRunError):
    """A local check before any network activity failed."""

    exit_code = 3
    meaning = (
        "preflight failed: input, output folder, party name, log folder, the local broker or "
        "the party's Ray head"
    )


class PeerError(PsiRunError):
    """The peer party is missing, unreachable, failed, or disagrees about the job."""

    exit_code = 4
    meaning = "the peer did not appear, cannot be reached, failed, or disagrees about the job"


class BackendError(PsiRunError):
    """The PSI itself failed; the raw SPU/SecretFlow text is in the log file."""

    exit_code = 5
    meaning = "the PSI itself failed in SPU or SecretFlow (the raw error is in the log)"


class EngineCrashed(PsiRunError):
    """The job process was killed by a signal (SPU's C++ code aborted or crashed)."""

    exit_code = 6
    meaning = "SPU's engine crashed (e.g. SIGABRT); no result was written"


class Interrupted(PsiRunError):
    """The run was stopped by Ctrl-C (SIGINT) or SIGTERM; no result was written."""

    exit_code = 130
    meaning = "interrupted (Ctrl-C, SIGINT or SIGTERM); the peer is told and stops too"


def exit_codes() -> list[tuple[int, str]]:
    """``(code, meaning)`` for every exit code psi-run uses, in code order."""
    tree = (
        PsiRunError,
        SpecError,
        PreflightError,
        PeerError,
        BackendError,
        EngineCrashed,
        Interrupted,
    )
    return [
        (EXIT_OK, "success; stdout holds the JSON report"),
        *sorted((cls.exit_code, cls.meaning) for cls in tree),
    ]
