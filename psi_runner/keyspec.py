"""What the spec says about key values: ``normalize:``, ``on_invalid:`` and ``prehashed:``.

``normalize`` maps a key column to a list of steps from a closed set, applied in order at both
parties before duplicates are checked and before SPU sees the key::

    normalize:
      phone: [nfkc, {e164: {region: CN}}]
      email: [{email: {gmail: true}}, sha256]

A step is a name, or a one-entry mapping of a name to its options. ``on_invalid`` says what
happens to a row whose key a step cannot parse or that becomes empty: ``refuse`` (the default)
or ``drop``. ``parties.<p>.prehashed`` declares that party p's column already holds the
SHA-256 of the normalised value (``sha256_hex`` or ``sha256_base64``), to be matched against a
partner that hashes in the spec (the column's steps end with ``sha256``). Everything here
enters the spec digest, so both sides apply the same rules by construction. The kernels are in
``normalize``; this module only parses and describes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from .errors import key_text, shown

STEPS = (
    "trim",
    "lower",
    "upper",
    "nfkc",
    "collapse_spaces",
    "digits_only",
    "e164",
    "email",
    "sha256",
)
_OPTIONS: dict[str, dict[str, type]] = {
    "e164": {"region": str},
    "email": {"gmail": bool},
    "sha256": {"salt": bool},
}
ON_INVALID = ("refuse", "drop")
PREHASHED = ("sha256_hex", "sha256_base64")
MAX_STEPS = 16  # a longer list is a mistake, not a pipeline
_REGION = re.compile(r"[A-Za-z]{2}")


@dataclass(frozen=True)
class Step:
    """One normalisation step and its options (only the step's own options are set)."""

    name: str
    region: str | None = None  # e164: the country of numbers written without +<country code>
    gmail: bool = False  # email: gmail.com / googlemail.com rules (dots, +tags)
    salt: bool = False  # sha256: prefix the value with the shared secret salt

    def describe(self) -> str:
        """The step as the spec digest and the handshake's messages show it."""
        if self.name == "e164":
            return f"e164(region={self.region})" if self.region else "e164"
        if self.name == "email" and self.gmail:
            return "email(gmail)"
        if self.name == "sha256" and self.salt:
            return "sha256(salted)"
        return self.name


def parse_normalize(value: Any, problems: list[str]) -> dict[str, tuple[Step, ...]]:
    """``normalize:``: column name -> steps; problems name the key path."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(
            "normalize: must map key columns to lists of steps, e.g. normalize: {phone: [trim]}"
        )
        return {}
    result: dict[str, tuple[Step, ...]] = {}
    for raw_column, raw_steps in value.items():
        column = str(raw_column) if isinstance(raw_column, (str, int)) else None
        path = f"normalize.{key_text(raw_column)}"
        if column is None or isinstance(raw_column, bool):
            problems.append(f"{path}: must be a key column name")
            continue
        if not isinstance(raw_steps, list) or not raw_steps:
            problems.append(
                f"{path}: must be a non-empty list of steps ({', '.join(STEPS)}), "
                f"got {shown(raw_steps)}"
            )
            continue
        if len(raw_steps) > MAX_STEPS:
            problems.append(f"{path}: at most {MAX_STEPS} steps, got {len(raw_steps)}")
            continue
        steps = [_step(item, f"{path}[{i}]", problems) for i, item in enumerate(raw_steps)]
        if all(s is not None for s in steps):
            result[column] = tuple(s for s in steps if s is not None)
            _order(result[column], path, problems)
    return result


def _step(item: Any, path: str, problems: list[str]) -> Step | None:
    if isinstance(item, str):
        name, options = item, {}
    elif isinstance(item, dict) and len(item) == 1:
        name, options = next(iter(item.items()))
        if options is None:
            options = {}
    else:
        problems.append(
            f"{path}: a step is a name or {{name: {{options}}}}, e.g. {{e164: {{region: CN}}}}, "
            f"got {shown(item)}"
        )
        return None
    if not isinstance(name, str) or name not in STEPS:
        problems.append(f"{path}: unknown step {shown(name)}; the steps are {', '.join(STEPS)}")
        return None
    allowed = _OPTIONS.get(name, {})
    if not isinstance(options, dict):
        problems.append(f"{path}: the options of {name} must be a mapping, got {shown(options)}")
        return None
    ok = True
    for key, val in options.items():
        if key not in allowed:
            what = ", ".join(allowed) if allowed else "none"
            problems.append(f"{path}.{key_text(key)}: unknown option of {name} (options: {what})")
            ok = False
        elif not isinstance(val, allowed[key]) or (allowed[key] is str and isinstance(val, bool)):
            kind = "true or false" if allowed[key] is bool else "text"
            problems.append(f"{path}.{key}: must be {kind}, got {shown(val)}")
            ok = False
    region = options.get("region")
    if ok and region is not None:
        region = _region(region, f"{path}.region", problems)
        ok = region is not None
    if not ok:
        return None
    return Step(
        name,
        region=region,
        gmail=bool(options.get("gmail", False)),
        salt=bool(options.get("salt", False)),
    )


def _region(value: str, path: str, problems: list[str]) -> str | None:
    """A two-letter region code that libphonenumber knows (CN, US, GB, ...)."""
    import phonenumbers  # only specs with e164 pay for the import (about 20 ms)

    code = value.upper()
    if not _REGION.fullmatch(value) or code not in phonenumbers.SUPPORTED_REGIONS:
        problems.append(
            f"{path}: must be a two-letter region code such as CN, US or GB, got {shown(value)}"
        )
        return None
    return code


def _order(steps: tuple[Step, ...], path: str, problems: list[str]) -> None:
    """sha256 ends a list: every later step would work on a hash."""
    for i, step in enumerate(steps[:-1]):
        if step.name == "sha256":
            problems.append(f"{path}[{i}]: sha256 must be the last step")


def parse_prehashed(value: Any, path: str, problems: list[str]) -> dict[str, str]:
    """``parties.<p>.prehashed``: column name -> sha256_hex | sha256_base64."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not value:
        problems.append(
            f"{path}: must map key columns to {' or '.join(PREHASHED)}, e.g. "
            "prehashed: {email: sha256_hex}"
        )
        return {}
    result: dict[str, str] = {}
    for raw_column, kind in value.items():
        where = f"{path}.{key_text(raw_column)}"
        if not isinstance(raw_column, (str, int)) or isinstance(raw_column, bool):
            problems.append(f"{where}: must be a key column name")
        elif kind not in PREHASHED:
            problems.append(f"{where}: must be {' or '.join(PREHASHED)}, got {shown(kind)}")
        else:
            result[str(raw_column)] = kind
    return result


def describe(steps: tuple[Step, ...]) -> list[str]:
    """The steps as a list of words (the spec digest and the handshake show these)."""
    return [s.describe() for s in steps]


def salted(steps: tuple[Step, ...]) -> bool:
    return any(s.name == "sha256" and s.salt for s in steps)


def ends_with_sha256(steps: tuple[Step, ...]) -> bool:
    return bool(steps) and steps[-1].name == "sha256"
