"""Exception tree of psi-run; each branch declares the exit code it maps to (the only place).

    PsiRunError                 root; an unexpected failure (exit 1)
    ├── SpecError               the job spec is unreadable or invalid (exit 2)
    ├── PreflightError          local input, output or broker is not usable (exit 3)
    │   └── CacheError          an unbalanced PSI cache is missing, stale or mismatched (exit 3)
    ├── PeerError               the peer did not appear, failed or runs a different job (exit 4)
    ├── BackendError            SPU/SecretFlow failed during the PSI (exit 5)
    │   ├── Stalled             the PSI made no progress on either side (exit 5)
    │   ├── LinkLost            SPU's link never reconnected to its restarted broker (exit 5)
    │   └── ResultsDisagree     the two parties' results differ; nothing written (exit 5)
    ├── EngineCrashed           the job process died by a signal, e.g. SPU's SIGABRT (exit 6)
    ├── OutputError             the result could not be written, e.g. a database table (exit 7)
    └── Interrupted             Ctrl-C (SIGINT) or SIGTERM; no result was written (exit 130)

Only the CLI turns these into an exit code and a one-line message; ``exit_codes()`` lists them
for the README and ``psi-run --help``.
"""

from __future__ import annotations

import math
import reprlib

EXIT_OK = 0

# The longest stderr line a refusal prints ("psi-run: " included), whatever the input: a value
# from the spec or a file is quoted through ``shown`` or ``cut``, never echoed whole.
LINE_MAX = 200
_CLI_PREFIX = len("psi-run: ")
_LISTED = 20  # problems a SpecError lists one per line; the rest are counted


def cut(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its two ends around `` ... ``."""
    if len(text) <= limit:
        return text
    tail = max(limit // 4, 1)
    return f"{text[: limit - tail - 5]} ... {text[-tail:]}"


class _Short(reprlib.Repr):
    """reprlib with small limits, and an integer too long to print described by its size."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxlevel, self.maxlist, self.maxtuple = 2, 3, 3
        self.maxdict, self.maxset, self.maxfrozenset = 3, 3, 3
        self.maxstring = self.maxother = self.maxlong = limit

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 256:  # str() of a huge int is slow, and refused past 4300 digits
            return f"<a number of about {int(math.log10(abs(x))) + 1} digits>"
        return super().repr_int(x, level)


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` in about ``limit`` characters, for quoting input in a message.

    Control characters and lone surrogates come out escaped (as ``repr`` writes them); a long
    text is cut and its length given; a huge number is described by its size."""
    if isinstance(value, str):
        text = repr(value[:limit])
        if len(value) <= limit and len(text) <= limit + 2:
            return text
        return f"{text[:limit]}...{text[0]} ({len(value)} characters)"
    return cut(_Short(limit).repr(value), limit + 20)


def key_text(key: object) -> str:
    """A mapping key as it goes into a key path: as written if short and printable, else
    quoted and cut to 22 characters (a problem naming it then still fits in a line)."""
    if isinstance(key, str) and 0 < len(key) <= 22 and key.isprintable() and key == key.strip():
        return key
    return cut(shown(key, 18), 22)


class PsiRunError(Exception):
    """Root of every error psi-run raises on purpose.

    ``kind`` names the category of failure in a few words; it is what the peer is told when
    this side fails (the message itself may hold paths or values and stays local). A raise
    site may pass a more precise ``kind``. ``from_peer`` marks an error that reports the
    peer's own failure (it is not announced back)."""

    exit_code = 1
    kind = "an unexpected error"
    meaning = "an unexpected failure (a bug; the log file has the traceback)"
    from_peer = False

    def __init__(self, *args: object, kind: str | None = None, from_peer: bool = False) -> None:
        super().__init__(*args)
        if kind is not None:
            self.kind = kind
        self.from_peer = from_peer


class SpecError(PsiRunError):
    """The job spec cannot be used; ``problems`` lists every issue with its key path."""

    exit_code = 2
    kind = "an invalid job spec"
    meaning = "the job spec is invalid (every problem is listed with its key path)"

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__(_spec_message(path, self.problems))


def _spec_message(path: str, problems: list[str]) -> str:
    """One line for one short problem; else a count, then one indented line per problem.

    Every line stays within ``LINE_MAX`` (with the CLI's prefix), whatever the spec holds;
    past ``_LISTED`` problems the rest are counted."""
    where = cut(path if path.isprintable() else repr(path)[1:-1], 120)
    lines = [cut(p, LINE_MAX - _CLI_PREFIX - 2) for p in problems[:_LISTED]]
    if len(lines) == 1 and _CLI_PREFIX + len(where) + 2 + len(lines[0]) <= LINE_MAX:
        return f"{where}: {lines[0]}"
    count = len(problems)
    text = f"{where}: {count} problem{'' if count == 1 else 's'}:"
    text += "".join(f"\n  {line}" for line in lines)
    if count > _LISTED:
        text += f"\n  ... and {count - _LISTED} more"
    return text


class PreflightError(PsiRunError):
    """A local check before any network activity failed."""

    exit_code = 3
    kind = "a local check failed"
    meaning = (
        "preflight failed: input, output folder, party name, log folder, the local broker or "
        "the party's Ray head"
    )


class CacheError(PreflightError):
    """An unbalanced PSI cache (either party's) cannot be used; both sides stop before any
    SPU link, naming the party and the fix."""

    kind = "an unbalanced PSI cache is not usable"


class PeerError(PsiRunError):
    """The peer party is missing, unreachable, failed, or disagrees about the job."""

    exit_code = 4
    kind = "a problem with the peer or the link"
    meaning = "the peer did not appear, cannot be reached, failed, or disagrees about the job"


class BackendError(PsiRunError):
    """The PSI itself failed; the raw SPU/SecretFlow text is in the log file."""

    exit_code = 5
    kind = "an error in the PSI engine"
    meaning = (
        "the PSI itself failed in SPU or SecretFlow (the raw error is in the log), or the two "
        "parties' results disagreed; no result was written"
    )


class Stalled(BackendError):
    """The PSI made no progress on either side for ``stall_timeout_s``; both sides stop."""

    kind = "the PSI made no progress (stalled)"


class LinkLost(BackendError):
    """SPU's link stopped calling its broker although the broker answers again (a client that
    never reconnected after a broker restart). ``restart``: both sides start the job again on
    their own (``relink``); otherwise this ends the job."""

    kind = "SPU's link did not reconnect to its broker"
    final_kind = "SPU's link did not reconnect to its broker, no automatic restart left"

    def __init__(self, *args: object, restart: bool = True, from_peer: bool = False) -> None:
        super().__init__(*args, kind=None if restart else self.final_kind, from_peer=from_peer)
        self.restart = restart


class ResultsDisagree(BackendError):
    """The result agreement check found that the two parties got different answers from SPU;
    neither side writes its result."""

    kind = "the two parties' results disagree"


class EngineCrashed(PsiRunError):
    """The job process was killed by a signal (SPU's C++ code aborted or crashed)."""

    exit_code = 6
    kind = "the PSI engine crashed"
    meaning = "SPU's engine crashed (e.g. SIGABRT); no result was written"


class OutputError(PsiRunError):
    """Writing the result failed after both sides agreed on it (e.g. the database refused the
    new table); an earlier result at the output is unchanged."""

    exit_code = 7
    kind = "writing the result failed"
    meaning = (
        "the result could not be written (e.g. a database table); the earlier one is unchanged"
    )


class Interrupted(PsiRunError):
    """The run was stopped by Ctrl-C (SIGINT) or SIGTERM; no result was written."""

    exit_code = 130
    kind = "interrupted (Ctrl-C, SIGINT or SIGTERM)"
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
        OutputError,
        Interrupted,
    )
    return [
        (EXIT_OK, "success; stdout holds the JSON report"),
        *sorted((cls.exit_code, cls.meaning) for cls in tree),
    ]
