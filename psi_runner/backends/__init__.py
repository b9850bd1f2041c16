"""Backends: where the one PSI call (``calls.execute``) runs.

Each backend module has ``run(spec, party, call, env, session) -> BackendResult`` and
``extra_sessions(session)`` (link sessions it opens besides the SPU link's). SPU, SecretFlow
and Ray errors are translated inside the backend, at its boundary, into ``PsiRunError``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class BackendResult:
    """SPU's intersection count for this party (-1: SPU does not tell it) and stage timings."""

    intersection_count: int
    seconds: dict[str, float] = field(default_factory=dict)


def backend_for(name: str) -> ModuleType:
    """The backend module of the spec's ``backend``."""
    if name == "embedded":
        from . import embedded

        return embedded
    from . import sf_backend  # secretflow and ray

    return sf_backend
