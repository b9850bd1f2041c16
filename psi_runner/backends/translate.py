"""Turning SPU/yacl/SecretFlow error text into a sentence with a likely cause and next step."""

from __future__ import annotations

import re

from ..errors import BackendError, PeerError, PsiRunError
from ..spec import JobSpec

# (substring of the raw error, error class, explanation) — first match wins.
_RULES: list[tuple[str, type[PsiRunError], str]] = [
    (
        "connect to mesh failed",
        PeerError,
        "the SPU link to {peer} did not form: check that {peer} runs the same job and that both "
        "brokers route to each other",
    ),
    (
        "Get data timeout",
        PeerError,
        "{peer} stopped sending (receive timeout): check {peer}'s log and the brokers' flow.log; "
        "raise link.recv_timeout_ms for very large inputs",
    ),
    (
        "Fail to connect to transport service",
        PeerError,
        "cannot reach this party's broker: check parties.{party}.broker and that psi-broker runs",
    ),
    (
        "Address already in use",
        BackendError,
        "a port is already in use: stop the other process or choose another port",
    ),
    (
        "filesystem error",
        BackendError,
        "SPU could not create or read a file: check that input and output paths are absolute "
        "and writable",
    ),
    (
        "E0000000618",
        PeerError,
        "this party's broker has no route to {peer}: add {peer} to its route_table.json",
    ),
    (
        "E0000000607",
        PeerError,
        "the broker of {peer} is unreachable: check the route in route_table.json and the network",
    ),
    (
        "E0000000403",
        PeerError,
        "{peer}'s broker refused the message: add this party to its route_table.json",
    ),
    (
        "duplicated read_cnt in result",
        BackendError,
        "SPU could not resume from the checkpoint (a known SPU 0.9.3b0 defect when the two "
        "sides stopped in different buckets)",
    ),
    (
        "duplicate",
        BackendError,
        "the input has duplicate keys: deduplicate it or set allow_duplicate_keys: true",
    ),
]


def translate_spu_error(exc: BaseException, spec: JobSpec, party: str, during: str) -> PsiRunError:
    text = str(exc)
    peer = spec.peer_of(party)
    for needle, cls, explanation in _RULES:
        if needle in text:
            return cls(
                f"job {spec.job_id}: {during} failed: " + explanation.format(peer=peer, party=party)
            )
    first = _first_line(text) or type(exc).__name__
    return BackendError(f"job {spec.job_id}: {during} failed ({first}); see the log file")


def _first_line(text: str) -> str:
    """The informative part of SPU's error text ("what:" and the enforce location dropped)."""
    for line in text.strip().splitlines():
        line = re.sub(r"^\s*(what:)?\s*(\[Enforce fail at [^\]]*\]\s*)?", "", line).strip()
        if line:
            return line[:200]
    return ""
