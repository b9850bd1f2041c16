"""The part of a spec that changes the computation, and its digest.

Both parties must agree on these fields; purely local ones (a party's own input and output
paths, its broker address) are left out, so each side may keep its files where it likes.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata

from .keyspec import describe
from .spec import JobSpec


def shared_fields(spec: JobSpec) -> dict[str, object]:
    return {
        "job_id": spec.job_id,
        "protocol": spec.protocol,
        "keys": list(spec.keys),
        "receiver": spec.receiver,
        "broadcast_result": spec.broadcast_result,
        "ecdh_curve": spec.ecdh_curve if spec.protocol == "ECDH" else None,
        "parties": spec.party_names,
        "allow_duplicate_keys": spec.allow_duplicate_keys,
        "link": spec.link.as_dict(),
        "backend": spec.backend,
        "api": spec.api,
        "join": spec.join,
        "left_side": spec.left_side,
        # Both sides detect a stall and start again together: the same limits on both.
        "stall_timeout_s": spec.stall_timeout_s,
        "retries": spec.retries,
        "shards": spec.shards,
        **key_rules(spec),
        # Which party is the unbalanced server (its cache folder is its own business).
        **({"unbalanced": {"server": spec.unbalanced.server}} if spec.unbalanced else {}),
    }


def key_rules(spec: JobSpec) -> dict[str, object]:
    """What turns a key value into the key SPU compares: every column's normalisation steps
    (an empty list: the value as it is), which party's column is already hashed, and what
    happens to a value that cannot be normalised. A difference names the column."""
    rules: dict[str, object] = {
        "normalize": {key: describe(spec.normalize.get(key, ())) for key in spec.keys},
        "on_invalid": spec.on_invalid,
        "prehashed": {name: dict(p.prehashed) for name, p in spec.parties.items() if p.prehashed},
    }
    if any(s.name == "e164" for steps in spec.normalize.values() for s in steps):
        # Phone parsing follows libphonenumber's metadata: both sides need the same release.
        rules["phonenumbers"] = metadata.version("phonenumbers")
    return rules


def spec_digest(spec: JobSpec) -> str:
    text = json.dumps(shared_fields(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
