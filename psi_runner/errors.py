"""Exception tree of psi-run, and the exit code each branch maps to.

    PsiRunError                 root (exit 1)
    ├── SpecError               the job spec is unreadable or invalid (exit 2)
    ├── PreflightError          local input, output or broker is not usable (exit 3)
    ├── PeerError               the peer did not appear or runs a different job (exit 4)
    └── BackendError            SPU/SecretFlow failed during the PSI (exit 5)

Only the CLI turns these into an exit code and a one-line message.
"""

from __future__ import annotations


class PsiRunError(Exception):
    """Root of every error psi-run raises on purpose."""

    exit_code = 1


class SpecError(PsiRunError):
    """The job spec cannot be used; ``problems`` lists every issue with its key path."""

    exit_code = 2

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


class PeerError(PsiRunError):
    """The peer party is missing, unreachable or disagrees about the job."""

    exit_code = 4


class BackendError(PsiRunError):
    """The PSI itself failed; the raw SPU/SecretFlow text is in the log file."""

    exit_code = 5
