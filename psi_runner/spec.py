"""The job spec: one YAML file that both parties read.

``load_spec(path)`` parses and validates it and reports every problem at once with its key
path (``parties.bob.input: required``). Unknown keys are errors. Relative paths resolve against
the spec file's folder. Party names are strings even when written as numbers (``9999:``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError
from .link import LINK_DEFAULTS, LinkSettings, parse_link_settings

PROTOCOLS = ("ECDH", "KKRT", "RR22")
BACKENDS = ("embedded", "secretflow", "ray")
APIS = ("psi", "psi_csv")
JOINS = ("inner", "left", "right", "full", "difference")
CURVES = ("CURVE_25519", "CURVE_FOURQ", "CURVE_SM2", "CURVE_SECP256K1")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PARTY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class PartySpec:
    """What one party brings: its broker's HTTP address and its own files."""

    name: str
    broker: str  # host:port of this party's own broker (HTTP PTP)
    input: Path
    output: Path
    ray_address: str | None = None  # host:port of the party's Ray head (backend: ray)


@dataclass(frozen=True)
class JobSpec:
    """A validated job spec. ``parties`` keeps the file's order (it fixes SPU ranks)."""

    path: Path
    job_id: str
    protocol: str
    keys: tuple[str, ...]
    receiver: str
    parties: dict[str, PartySpec]
    broadcast_result: bool = True
    ecdh_curve: str = "CURVE_25519"
    link: LinkSettings = field(default_factory=LinkSettings)
    timeout_s: float = 600.0
    allow_duplicate_keys: bool = False
    backend: str = "embedded"
    api: str = "psi"
    join: str = "inner"
    left_side: str | None = None  # the left table's party for join left/right/full/difference

    @property
    def party_names(self) -> list[str]:
        return list(self.parties)

    def peer_of(self, party: str) -> str:
        return next(p for p in self.parties if p != party)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping with the same key twice (YAML allows it silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:  # e.g. "[a, b]: 1"; without this check: a TypeError traceback
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a plain value, not a list or mapping",
                key_node.start_mark,
            ) from None
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None,
                f"key {key!r} appears twice (line {seen[key].start_mark.line + 1} "
                f"and line {mark.line + 1}); keep one",
                mark,
            )
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping
)

# YAML 1.1 reads 0001 as octal 1, 0x10 as 16 and 1:30 as 90, which silently renamed a party
# written as ``0001:``. Only plain decimal numbers are ints here; the rest stay text.
# Dates are text too (a job_id of 2024-01-01 is a name, not a date).
_INT_TAG = "tag:yaml.org,2002:int"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_DECIMAL = re.compile(r"^[-+]?(?:0|[1-9][0-9_]*)$")
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, _DECIMAL if tag == _INT_TAG else rx) for tag, rx in resolvers
            if tag != _TIMESTAMP_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_TOP_KEYS = {
    "job_id", "protocol", "keys", "receiver", "broadcast_result", "ecdh_curve", "parties", "link",
    "timeout_s", "allow_duplicate_keys", "backend", "api", "join", "left_side",
}
_PARTY_KEYS = {"broker", "input", "output", "ray_address"}


def _name(value: Any) -> str | None:
    """Party names and ids may be written as numbers in YAML; they are strings."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, str)):
        return str(value)
    return None


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file; raise SpecError listing every problem."""
    spec_path = Path(path).expanduser()
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(spec_path), ["file not found"]) from None
    except IsADirectoryError:
        raise SpecError(str(spec_path), ["is a folder, not a YAML file"]) from None
    except UnicodeDecodeError:
        raise SpecError(str(spec_path), ["not UTF-8 text"]) from None
    except OSError as exc:
        raise SpecError(str(spec_path), [f"cannot read: {exc.strerror}"]) from None
    return parse_spec(text, spec_path.resolve())


def parse_spec(text: str, spec_path: Path) -> JobSpec:
    """Validate spec text; ``spec_path`` anchors relative paths."""
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - safe loader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(str(spec_path), [f"not valid YAML{where}: {problem}"]) from None
    if not isinstance(doc, dict):
        raise SpecError(str(spec_path), ["the file must be a YAML mapping of job settings"])

    problems: list[str] = []
    for key in doc:
        if key not in _TOP_KEYS:
            problems.append(f"{key}: unknown key (allowed: {', '.join(sorted(_TOP_KEYS))})")

    job_id = _name(doc.get("job_id"))
    if job_id is None:
        problems.append("job_id: required, e.g. job_id: demo-001")
    elif not _ID.match(job_id):
        problems.append("job_id: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric")

    protocol = doc.get("protocol", "RR22")
    if not isinstance(protocol, str) or protocol.upper() not in PROTOCOLS:
        problems.append(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
        protocol = "RR22"
    protocol = protocol.upper()

    keys = _keys(doc.get("keys"), problems)
    parties = _parties(doc.get("parties"), spec_path.parent, problems)

    receiver = _name(doc.get("receiver"))
    if receiver is None:
        problems.append("receiver: required, the party that receives the result")
    elif parties and receiver not in parties:
        problems.append(f"receiver: {receiver!r} is not one of the parties ({', '.join(parties)})")

    broadcast = doc.get("broadcast_result", True)
    if not isinstance(broadcast, bool):
        problems.append(f"broadcast_result: must be true or false, got {broadcast!r}")
        broadcast = True

    curve = doc.get("ecdh_curve")
    if curve is not None:
        if protocol != "ECDH":
            problems.append("ecdh_curve: only applies to protocol ECDH; remove it")
        elif not isinstance(curve, str) or curve.upper() not in CURVES:
            problems.append(f"ecdh_curve: must be one of {', '.join(CURVES)}, got {curve!r}")
    curve = curve.upper() if isinstance(curve, str) and curve.upper() in CURVES else "CURVE_25519"

    link = parse_link_settings(doc.get("link"), problems)

    timeout_s = doc.get("timeout_s", 600)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or timeout_s <= 0:
        problems.append(f"timeout_s: must be a number of seconds > 0, got {timeout_s!r}")
        timeout_s = 600
    allow_dups = doc.get("allow_duplicate_keys", False)
    if not isinstance(allow_dups, bool):
        problems.append(f"allow_duplicate_keys: must be true or false, got {allow_dups!r}")
        allow_dups = False

    backend = _choice(doc, "backend", BACKENDS, "embedded", problems)
    api = _choice(doc, "api", APIS, "psi", problems)
    join = _choice(doc, "join", JOINS, "inner", problems)
    if api == "psi_csv":
        if join != "inner":
            problems.append(f"join: {join} needs api: psi; the legacy psi_csv call only "
                            "computes the intersection")
        if allow_dups:
            problems.append("allow_duplicate_keys: the legacy psi_csv call cannot take "
                            "duplicate keys; use api: psi or deduplicate the input")
    left_side = _name(doc.get("left_side")) if "left_side" in doc else None
    if "left_side" in doc:
        if join == "inner":
            problems.append("left_side: only applies to join: left, right, full or difference; "
                            "remove it")
        elif left_side is None or (parties and left_side not in parties):
            problems.append(f"left_side: must be one of the parties ({', '.join(parties)}), "
                            f"got {doc.get('left_side')!r}")
    if join != "inner" and left_side is None:
        left_side = receiver  # SecretFlow's default: the receiver's table is the left one
    for name, party in parties.items():
        where = f"parties.{name}.ray_address"
        if backend == "ray" and party.ray_address is None:
            problems.append(f"{where}: required with backend: ray, the host:port of "
                            f"{name}'s Ray head (e.g. 127.0.0.1:31000)")
        elif backend != "ray" and party.ray_address is not None:
            problems.append(f"{where}: only used with backend: ray (this spec has backend: "
                            f"{backend}); remove it or set backend: ray")

    if problems:
        raise SpecError(str(spec_path), problems)
    return JobSpec(
        path=spec_path,
        job_id=job_id,  # type: ignore[arg-type]
        protocol=protocol,
        keys=keys,
        receiver=receiver,  # type: ignore[arg-type]
        parties=parties,
        broadcast_result=broadcast,
        ecdh_curve=curve,
        link=link,
        timeout_s=float(timeout_s),
        allow_duplicate_keys=allow_dups,
        backend=backend,
        api=api,
        join=join,
        left_side=left_side,
    )


def _choice(doc: dict, key: str, allowed: tuple[str, ...], default: str,
            problems: list[str]) -> str:
    value = doc.get(key, default)
    if not isinstance(value, str) or value.lower() not in allowed:
        problems.append(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")
        return default
    return value.lower()


def _keys(value: Any, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        if value is None:
            problems.append("keys: required, a list of key column names, e.g. keys: [uid]")
        else:
            problems.append(f"keys: must be a list of key column names, e.g. keys: [uid], "
                            f"got {value!r}")
        return ()
    keys: list[str] = []
    for i, item in enumerate(value):
        name = _name(item)
        if name is None or name == "":
            problems.append(f"keys[{i}]: must be a column name, got {item!r}")
        elif name in keys:
            problems.append(f"keys[{i}]: {name!r} is listed twice")
        else:
            keys.append(name)
    return tuple(keys)


def _parties(value: Any, base: Path, problems: list[str]) -> dict[str, PartySpec]:
    if not isinstance(value, dict):
        problems.append("parties: required, a mapping of exactly two party names to settings")
        return {}
    names = [_name(k) for k in value]
    if len(value) != 2:
        problems.append(f"parties: exactly two parties are needed, found {len(value)}")
    result: dict[str, PartySpec] = {}
    for raw_name, name in zip(value, names):
        path = f"parties.{raw_name}"
        if name is None or not _PARTY.match(name):
            problems.append(
                f"{path}: party names use 1-64 letters, digits, '.', '_' or '-'"
            )
            continue
        if name in result:
            problems.append(f"{path}: party {name!r} appears twice")
            continue
        settings = value[raw_name]
        if not isinstance(settings, dict):
            problems.append(f"{path}: must be a mapping with broker, input and output")
            continue
        for key in settings:
            if key not in _PARTY_KEYS:
                problems.append(
                    f"{path}.{key}: unknown key (allowed: {', '.join(sorted(_PARTY_KEYS))})"
                )
        broker = _broker(settings.get("broker"), f"{path}.broker", problems)
        ray_address = None
        if "ray_address" in settings:
            ray_address = _broker(settings.get("ray_address"), f"{path}.ray_address", problems,
                                  what="host:port of this party's Ray head",
                                  example="31000") or ""  # "": given but invalid (reported)
        inp = _path(settings.get("input"), base, f"{path}.input", problems)
        out = _path(settings.get("output"), base, f"{path}.output", problems)
        if inp is not None and out is not None and inp == out:
            problems.append(f"{path}.output: must differ from the input file")
        if broker and inp and out:
            result[name] = PartySpec(name=name, broker=broker, input=inp, output=out,
                                     ray_address=ray_address)
    return result


def _broker(value: Any, path: str, problems: list[str],
            what: str = "host:port of this party's broker HTTP port",
            example: str = "9380") -> str | None:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{path}: required, {what}")
        return None
    text = value.strip()
    for prefix in ("http://", "https://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    text = text.rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        problems.append(f"{path}: must be host:port, e.g. 127.0.0.1:{example}, got {value!r}")
        return None
    return text


def _path(value: Any, base: Path, path: str, problems: list[str]) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{path}: required, a file path (relative paths start at the spec's folder)")
        return None
    p = Path(value.strip()).expanduser()
    return (p if p.is_absolute() else base / p).resolve()


__all__ = ["JobSpec", "PartySpec", "load_spec", "parse_spec", "LINK_DEFAULTS", "PROTOCOLS",
           "BACKENDS", "APIS", "JOINS"]
