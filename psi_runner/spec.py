"""The job spec: one YAML file that both parties read.

``load_spec(path)`` parses and validates it and reports every problem at once with its key
path (``parties.bob.input: required``). Unknown keys are errors. Relative paths resolve against
the spec file's folder. Party names are strings even when written as numbers (``9999:``).
Reading the file and its YAML within bounds is ``specfile``'s; here every value is checked
before use: numbers for range (NaN, infinities and huge numbers are out of range), text for
control characters and lone surrogates, and a problem quotes at most a short piece of a value.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .dbspec import DbConfig, parse_config
from .errors import SpecError, key_text, shown
from .keyspec import ON_INVALID, Step, ends_with_sha256, parse_normalize, parse_prehashed, salted
from .link import LINK_DEFAULTS, LinkSettings, parse_link_settings
from .specfile import LongNumber, SpecProblem, load_yaml, read_spec_text
from .unbalanced import UnbalancedSpec, parse_unbalanced, unbalanced_rules

PROTOCOLS = ("ECDH", "KKRT", "RR22", "ECDH_OPRF_UB")
BACKENDS = ("embedded", "secretflow", "ray")
APIS = ("psi", "psi_csv")
JOINS = ("inner", "left", "right", "full", "difference")
CURVES = ("CURVE_25519", "CURVE_FOURQ", "CURVE_SM2", "CURVE_SECP256K1")
# The one default JobSpec cannot carry: its protocol field comes before the required fields.
_DEFAULT_PROTOCOL = "RR22"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # fullmatch: "$" would allow a final "\n"
_PARTY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TIMEOUT_MAX_S = 86_400  # timeout_s: a peer that starts more than a day late needs a new run
RETRIES_MAX = 10  # a job that stalls ten times in a row needs a person, not an eleventh try
SHARDS_MAX = 64  # each shard is an SPU process (or Ray task) of its own at each party
PATH_MAX_BYTES = 4096  # Linux's PATH_MAX
KEY_NAME_MAX = 256  # characters in a key column's name
# C0 and C1 control characters (NUL included) and lone surrogates: no id, name or path holds one.
_BAD_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# host:port; host is a name or an IPv4 address, or an IPv6 address in brackets.
_ADDRESS = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[\w.-]{1,253}):([0-9]{1,5})")


@dataclass(frozen=True)
class PartySpec:
    """What one party brings: its broker's HTTP address and its own files."""

    name: str
    broker: str  # host:port of this party's own broker (HTTP PTP)
    input: Path | DbConfig  # a CSV or Parquet path, or a PostgreSQL table or query
    output: Path | DbConfig  # a CSV or Parquet path, or a PostgreSQL table
    ray_address: str | None = None  # host:port of the party's Ray head (backend: ray)
    # key column -> sha256_hex | sha256_base64: the column already holds the hash (keyspec)
    prehashed: dict[str, str] = field(default_factory=dict)
    salt_file: Path | None = None  # the shared secret salt of salted sha256 steps (local)
    work_dir: Path | None = None  # where local work files go when the output is not a file

    @property
    def local_folder(self) -> Path:
        """Where this party's run keeps its lock, work folder and checkpoint: beside a file
        output (same file system, so the result is renamed into place), else ``work_dir``."""
        if isinstance(self.output, Path):
            return self.output.parent
        assert self.work_dir is not None
        return self.work_dir


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
    stall_timeout_s: float = 900.0  # 0: no stall detection
    retries: int = 0  # fresh starts after a stall
    allow_duplicate_keys: bool = False
    backend: str = "embedded"
    api: str = "psi"
    join: str = "inner"
    left_side: str | None = None  # the left table's party for join left/right/full/difference
    # key column -> normalisation steps, applied in order at both parties (keyspec)
    normalize: dict[str, tuple[Step, ...]] = field(default_factory=dict)
    on_invalid: str = "refuse"  # a key a step cannot parse or that becomes empty: refuse | drop
    shards: int = 1  # independent SPU PSIs over a keyed hash of the key, merged (shards.py)
    # protocol ECDH_OPRF_UB: the large (server) party and each party's cache (unbalanced.py)
    unbalanced: UnbalancedSpec | None = None

    @property
    def party_names(self) -> list[str]:
        return list(self.parties)

    def peer_of(self, party: str) -> str:
        return next(p for p in self.parties if p != party)


# A key the spec leaves out takes JobSpec's field default; nothing below repeats a default.
_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(JobSpec) if f.default is not MISSING}


_TOP_KEYS = {
    "job_id",
    "protocol",
    "keys",
    "receiver",
    "broadcast_result",
    "ecdh_curve",
    "parties",
    "link",
    "timeout_s",
    "stall_timeout_s",
    "retries",
    "allow_duplicate_keys",
    "backend",
    "api",
    "join",
    "left_side",
    "normalize",
    "on_invalid",
    "shards",
    "unbalanced",
}
_PARTY_KEYS = {
    "broker", "input", "output", "ray_address", "prehashed", "salt_file", "work_dir",
}  # fmt: skip


def _name(value: Any) -> str | None:
    """Party names and ids may be written as numbers in YAML; they are strings."""
    if isinstance(value, (bool, LongNumber)) or value is None:
        return None
    if isinstance(value, (int, str)):
        return str(value)
    return None


def _bad_text(text: str) -> str | None:
    """What makes ``text`` unusable as an id, name or path (a control character, a lone
    surrogate), or None."""
    bad = _BAD_TEXT.search(text)
    if bad is None:
        return None
    code = ord(bad.group())
    what = "a lone surrogate" if code >= 0xD800 else "a control character"
    if code == 0:
        what = "a NUL byte"
    return f"holds {what} (U+{code:04X}) at character {bad.start() + 1}"


def load_spec(path: str | Path) -> JobSpec:
    """Read and validate a job spec file; raise SpecError listing every problem."""
    try:
        spec_path = Path(path).expanduser()
        text = read_spec_text(spec_path)
        resolved = spec_path.resolve()
    except SpecProblem as exc:
        raise SpecError(str(path), [str(exc)]) from None
    except (OSError, RuntimeError) as exc:  # "~nosuchuser", a symlink loop
        raise SpecError(str(path), [f"cannot read: {exc}"]) from None
    return parse_spec(text, resolved)


def parse_spec(text: str, spec_path: Path) -> JobSpec:
    """Validate spec text; ``spec_path`` anchors relative paths."""
    doc = _load_mapping(text, spec_path)
    problems: list[str] = []
    values = _parse_fields(doc, spec_path.parent, problems)
    problems.extend(_cross_checks(values, doc))
    if problems:
        raise SpecError(str(spec_path), problems)
    values["timeout_s"] = float(values["timeout_s"])  # YAML gives 600 as an int
    values["stall_timeout_s"] = float(values["stall_timeout_s"])
    if values["join"] != "inner" and values["left_side"] is None:
        # SecretFlow's default: the receiver's table is the left one.
        values["left_side"] = values["receiver"]
    return JobSpec(path=spec_path, **values)


def _load_mapping(text: str, spec_path: Path) -> dict[Any, Any]:
    """The YAML document, which must be a mapping; malformed YAML is one problem, not many."""
    try:
        doc = load_yaml(text)
    except SpecProblem as exc:
        raise SpecError(str(spec_path), [str(exc)]) from None
    if not isinstance(doc, dict):
        raise SpecError(str(spec_path), ["the file must be a YAML mapping of job settings"])
    return doc


# --- one parser per field ------------------------------------------------------------------
# Each reads its raw value, appends problems with the key path, and returns the parsed value,
# or the default where the value is bad, so later checks still have a value to compare.


def _parse_fields(doc: dict[Any, Any], base: Path, problems: list[str]) -> dict[str, Any]:
    """Every JobSpec field except ``path``, parsed on its own."""
    _unknown_keys(doc, _TOP_KEYS, "", problems)
    job_id = _job_id(doc.get("job_id"), problems)
    protocol = _protocol(doc.get("protocol", _DEFAULT_PROTOCOL), problems)
    keys = _keys(doc.get("keys"), problems)
    parties = _parties(doc.get("parties"), base, problems)
    # Evaluated top to bottom: this is the order in which problems are reported.
    return {
        "job_id": job_id,
        "protocol": protocol,
        "keys": keys,
        "parties": parties,
        "receiver": _receiver(doc.get("receiver"), parties, problems),
        "broadcast_result": _flag(doc, "broadcast_result", problems),
        "ecdh_curve": _ecdh_curve(doc.get("ecdh_curve"), protocol, problems),
        "link": parse_link_settings(doc.get("link"), problems),
        "timeout_s": _timeout_s(doc.get("timeout_s", _DEFAULTS["timeout_s"]), problems),
        "stall_timeout_s": _stall_timeout_s(
            doc.get("stall_timeout_s", _DEFAULTS["stall_timeout_s"]), problems
        ),
        "retries": _retries(doc.get("retries", _DEFAULTS["retries"]), problems),
        "allow_duplicate_keys": _flag(doc, "allow_duplicate_keys", problems),
        "backend": _choice(doc, "backend", BACKENDS, problems),
        "api": _choice(doc, "api", APIS, problems),
        "join": _choice(doc, "join", JOINS, problems),
        "left_side": _name(doc.get("left_side")),  # checked against join and parties later
        "normalize": parse_normalize(doc.get("normalize"), problems),
        "on_invalid": _choice(doc, "on_invalid", ON_INVALID, problems),
        "shards": _shards(doc.get("shards", _DEFAULTS["shards"]), problems),
        "unbalanced": parse_unbalanced(doc.get("unbalanced"), base, _path, problems),
    }


def _unknown_keys(
    mapping: dict[Any, Any], allowed: set[str], prefix: str, problems: list[str]
) -> None:
    for key in mapping:
        if key not in allowed:
            guess = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = (
                f"did you mean {guess[0]}?" if guess else f"allowed: {', '.join(sorted(allowed))}"
            )
            problems.append(f"{prefix}{key_text(key)}: unknown key ({hint})")


def _job_id(value: Any, problems: list[str]) -> str | None:
    if value is None:
        problems.append("job_id: required, e.g. job_id: demo-001")
        return None
    job_id = _name(value)
    if job_id is None or not _ID.fullmatch(job_id):
        problems.append(
            "job_id: use 1-64 letters, digits, '.', '_' or '-', starting alphanumeric, "
            f"got {shown(value)}"
        )
        return None
    return job_id


def _protocol(value: Any, problems: list[str]) -> str:
    if not isinstance(value, str) or value.upper() not in PROTOCOLS:
        problems.append(f"protocol: must be one of {', '.join(PROTOCOLS)}, got {shown(value, 24)}")
        return _DEFAULT_PROTOCOL
    return value.upper()


def _ecdh_curve(value: Any, protocol: str, problems: list[str]) -> str:
    # Parsed together with the protocol: under another protocol the curve is refused outright,
    # and its value is not checked (one problem, not two).
    if value is not None:
        if protocol != "ECDH":
            problems.append("ecdh_curve: only applies to protocol ECDH; remove it")
        elif not isinstance(value, str) or value.upper() not in CURVES:
            problems.append(f"ecdh_curve: must be one of {', '.join(CURVES)}, got {shown(value)}")
    if isinstance(value, str) and value.upper() in CURVES:
        return value.upper()
    return _DEFAULTS["ecdh_curve"]


def _keys(value: Any, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        if value is None:
            problems.append("keys: required, a list of key column names, e.g. keys: [uid]")
        else:
            problems.append(
                f"keys: must be a list of key column names, e.g. keys: [uid], got {shown(value)}"
            )
        return ()
    keys: dict[str, None] = {}  # ordered, and O(1) to look up in a long list
    for i, item in enumerate(value):
        name = _name(item)
        if name is None or name == "":
            problems.append(f"keys[{i}]: must be a column name, got {shown(item)}")
        elif bad := _bad_text(name):
            problems.append(f"keys[{i}]: {bad}; a column name cannot hold one")
        elif len(name) > KEY_NAME_MAX:
            problems.append(
                f"keys[{i}]: a column name has at most {KEY_NAME_MAX} characters, got {shown(name)}"
            )
        elif name in keys:
            problems.append(f"keys[{i}]: {shown(name)} is listed twice")
        else:
            keys[name] = None
    return tuple(keys)


def _receiver(value: Any, parties: dict[str, PartySpec], problems: list[str]) -> str | None:
    # Checked against the parties here rather than among the cross-field rules so that its
    # problem keeps its place in the report, right after the parties' own.
    receiver = _name(value)
    if value is None:
        problems.append("receiver: required, the party that receives the result")
    elif receiver is None or (parties and receiver not in parties):
        problems.append(
            f"receiver: {shown(value if receiver is None else receiver)} is not one of the "
            f"parties ({', '.join(parties)})"
        )
    return receiver


def _flag(doc: dict[Any, Any], key: str, problems: list[str]) -> bool:
    value = doc.get(key, _DEFAULTS[key])
    if not isinstance(value, bool):
        problems.append(f"{key}: must be true or false, got {shown(value)}")
        return _DEFAULTS[key]
    return value


def _number(
    value: Any, key: str, fits: Callable[[float], bool], rule: str, problems: list[str]
) -> Any:
    """``value`` when it is a number (not a bool) that ``fits``; else the key's default and
    a problem ``<key>: must be <rule>, got ...``. NaN and infinity fit no range."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not fits(value):
        problems.append(f"{key}: must be {rule}, got {shown(value)}")
        return _DEFAULTS[key]
    return value


def _timeout_s(value: Any, problems: list[str]) -> float:
    return _number(
        value,
        "timeout_s",
        lambda v: 0 < v <= TIMEOUT_MAX_S,
        f"a number of seconds > 0 and at most {TIMEOUT_MAX_S} (a day)",
        problems,
    )


def _stall_timeout_s(value: Any, problems: list[str]) -> float:
    return _number(
        value,
        "stall_timeout_s",
        lambda v: v == 0 or 1 <= v <= TIMEOUT_MAX_S,
        f"0 (off) or a number of seconds from 1 to {TIMEOUT_MAX_S}",
        problems,
    )


def _retries(value: Any, problems: list[str]) -> int:
    return _number(
        value,
        "retries",
        lambda v: isinstance(v, int) and 0 <= v <= RETRIES_MAX,
        f"a whole number from 0 to {RETRIES_MAX}",
        problems,
    )


def _shards(value: Any, problems: list[str]) -> int:
    return _number(
        value,
        "shards",
        lambda v: isinstance(v, int) and 1 <= v <= SHARDS_MAX,
        f"a whole number from 1 (no sharding) to {SHARDS_MAX}",
        problems,
    )


def _choice(doc: dict[Any, Any], key: str, allowed: tuple[str, ...], problems: list[str]) -> str:
    value = doc.get(key, _DEFAULTS[key])
    if not isinstance(value, str) or value.lower() not in allowed:
        problems.append(f"{key}: must be one of {', '.join(allowed)}, got {shown(value)}")
        return _DEFAULTS[key]
    return value.lower()


def _parties(value: Any, base: Path, problems: list[str]) -> dict[str, PartySpec]:
    if not isinstance(value, dict):
        problems.append("parties: required, a mapping of exactly two party names to settings")
        return {}
    if len(value) != 2:
        problems.append(f"parties: exactly two parties are needed, found {len(value)}")
    result: dict[str, PartySpec] = {}
    for raw_name, settings in value.items():
        name = _name(raw_name)
        valid = name is not None and _PARTY.fullmatch(name) is not None
        path = f"parties.{name if valid else key_text(raw_name)}"
        if not valid:
            problems.append(f"{path}: party names use 1-64 letters, digits, '.', '_' or '-'")
        elif name in result:  # 9999 and "9999" are the same party
            problems.append(f"{path}: party {name!r} appears twice")
        else:
            party = _party(name, settings, base, path, problems)
            if party is not None:
                result[name] = party
    return result


def _party(
    name: str, settings: Any, base: Path, path: str, problems: list[str]
) -> PartySpec | None:
    """One party's settings; None if any of them is bad (the problems say which)."""
    if not isinstance(settings, dict):
        problems.append(f"{path}: must be a mapping with broker, input and output")
        return None
    _unknown_keys(settings, _PARTY_KEYS, f"{path}.", problems)
    broker = _broker(settings.get("broker"), f"{path}.broker", problems)
    ray_address = _ray_address(settings, path, problems)
    inp, out = _files(settings, base, path, problems)
    prehashed = parse_prehashed(settings.get("prehashed"), f"{path}.prehashed", problems)
    salt_file = None
    if "salt_file" in settings:
        salt_file = _path(settings.get("salt_file"), base, f"{path}.salt_file", problems)
    work_dir = None
    if "work_dir" in settings:
        work_dir = _path(settings.get("work_dir"), base, f"{path}.work_dir", problems)
    elif out is not None and not isinstance(out, Path):
        work_dir = base  # a database output: local work files beside the spec
    if not (broker and inp and out):
        return None
    return PartySpec(
        name=name,
        broker=broker,
        input=inp,
        output=out,
        ray_address=ray_address,
        prehashed=prehashed,
        salt_file=salt_file,
        work_dir=work_dir,
    )


def _ray_address(settings: dict[Any, Any], path: str, problems: list[str]) -> str | None:
    if "ray_address" not in settings:
        return None
    address = _broker(
        settings.get("ray_address"),
        f"{path}.ray_address",
        problems,
        what="host:port of this party's Ray head",
        example="31000",
    )
    # "" marks "given but invalid" (already reported), so the backend check does not also
    # call it missing.
    return address or ""


def _files(
    settings: dict[Any, Any], base: Path, path: str, problems: list[str]
) -> tuple[Path | DbConfig | None, Path | DbConfig | None]:
    inp, out = (
        parse_config(value, base, f"{path}.{key}", problems, output=key == "output")
        if isinstance(value, dict)
        else _path(value, base, f"{path}.{key}", problems)
        for key, value in (("input", settings.get("input")), ("output", settings.get("output")))
    )
    if inp is not None and out is not None and inp == out:
        problems.append(f"{path}.output: must differ from the input file")
    return inp, out


def _broker(
    value: Any,
    path: str,
    problems: list[str],
    what: str = "host:port of this party's broker HTTP port",
    example: str = "9380",
) -> str | None:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{path}: required, {what}")
        return None
    text = value.strip()
    for prefix in ("http://", "https://"):
        text = text.removeprefix(prefix)
    text = text.rstrip("/")
    address = _ADDRESS.fullmatch(text)
    if address is None or not 0 < int(address[2]) < 65536:
        problems.append(f"{path}: must be host:port, e.g. 127.0.0.1:{example}, got {shown(value)}")
        return None
    return text


def _path(value: Any, base: Path, path: str, problems: list[str]) -> Path | None:
    if not isinstance(value, str) or not value.strip():
        problems.append(
            f"{path}: required, a file path (relative paths start at the spec's folder)"
        )
        return None
    text = value.strip()
    bad = _bad_text(text)
    if bad:
        problems.append(f"{path}: {bad}; a file path cannot hold one")
        return None
    if len(text.encode("utf-8")) >= PATH_MAX_BYTES:
        problems.append(f"{path}: longer than {PATH_MAX_BYTES} bytes, got {shown(text)}")
        return None
    try:
        p = Path(text).expanduser()
        return (p if p.is_absolute() else base / p).resolve()
    except (OSError, RuntimeError) as exc:  # "~nosuchuser/x", a symbolic link loop
        problems.append(f"{path}: cannot resolve {shown(text)} ({shown(str(exc), 60)[1:-1]})")
        return None


# --- rules across fields -------------------------------------------------------------------
# Each sees the parsed values (a bad field reads as its default) and the raw document, which
# tells a key left out from one given a bad value.

_Rule = Callable[[dict[str, Any], dict[Any, Any]], Iterator[str]]


def _cross_checks(values: dict[str, Any], doc: dict[Any, Any]) -> list[str]:
    """Problems from rules that span several fields, in the order of ``_RULES``."""
    return [problem for rule in _RULES for problem in rule(values, doc)]


def _psi_csv_limits(values: dict[str, Any], doc: dict[Any, Any]) -> Iterator[str]:
    if values["api"] != "psi_csv":
        return
    if values["join"] != "inner":
        yield (
            f"join: {values['join']} needs api: psi; the legacy psi_csv call only "
            "computes the intersection"
        )
    if values["allow_duplicate_keys"]:
        yield (
            "allow_duplicate_keys: the legacy psi_csv call cannot take "
            "duplicate keys; use api: psi or deduplicate the input"
        )


def _shards_fit_call(values: dict[str, Any], doc: dict[Any, Any]) -> Iterator[str]:
    if values["shards"] == 1:
        return
    if values["api"] != "psi":
        yield "shards: needs api: psi (the legacy psi_csv call is not sharded); remove shards"
    elif values["join"] != "inner" and values["allow_duplicate_keys"]:
        yield (
            f"shards: a sharded join: {values['join']} needs unique keys; remove shards or "
            "allow_duplicate_keys"
        )


def _left_side_fits_join(values: dict[str, Any], doc: dict[Any, Any]) -> Iterator[str]:
    if "left_side" not in doc:
        return
    left_side, parties = values["left_side"], values["parties"]
    if values["join"] == "inner":
        yield "left_side: only applies to join: left, right, full or difference; remove it"
    elif left_side is None or (parties and left_side not in parties):
        yield (
            f"left_side: must be one of the parties ({', '.join(parties)}), "
            f"got {shown(doc.get('left_side'))}"
        )


def _ray_addresses_fit_backend(values: dict[str, Any], doc: dict[Any, Any]) -> Iterator[str]:
    backend = values["backend"]
    for name, party in values["parties"].items():
        where = f"parties.{name}.ray_address"
        if backend == "ray" and party.ray_address is None:
            yield (
                f"{where}: required with backend: ray, the host:port of "
                f"{name}'s Ray head (e.g. 127.0.0.1:31000)"
            )
        elif backend != "ray" and party.ray_address is not None:
            yield (
                f"{where}: only used with backend: ray (this spec has backend: "
                f"{backend}); remove it or set backend: ray"
            )


def _normalize_fits_keys(values: dict[str, Any], doc: dict[Any, Any]) -> Iterator[str]:
    keys, normalize = values["keys"], values["normalize"]
    if not keys:
        return  # already a problem of its own
    for column in normalize:
        if column not in keys:
            yield f"normalize.{key_text(column)}: not a key column; the keys are {', '.join(keys)}"
    for name, party in values["parties"].items():
        for column in party.prehashed:
            where = f"parties.{name}.prehashed.{key_text(column)}"
            if column not in keys:
                yield f"{where}: not a key column; the keys are {', '.join(keys)}"
            elif not ends_with_sha256(normalize.get(column, ())):
                yield (
                    f"{where}: the column's steps must end with sha256 (e.g. normalize: "
                    f"{{{key_text(column)}: [email, sha256]}}) so that the other party hashes "
                    "the same way"
                )
        needs_salt = [
            c for c, steps in normalize.items() if salted(steps) and c not in party.prehashed
        ]
        if needs_salt and party.salt_file is None:
            yield (
                f"parties.{name}.salt_file: required: normalize.{key_text(needs_salt[0])} hashes "
                "with a salt; name the file holding the secret salt shared out of band"
            )
        elif party.salt_file is not None and not needs_salt:
            yield (
                f"parties.{name}.salt_file: only used by a sha256 step with salt: true that "
                f"{name} applies; remove it"
            )


_RULES: tuple[_Rule, ...] = (
    _psi_csv_limits,
    _shards_fit_call,
    unbalanced_rules,
    _left_side_fits_join,
    _ray_addresses_fit_backend,
    _normalize_fits_keys,
)


__all__ = [
    "APIS",
    "BACKENDS",
    "JOINS",
    "LINK_DEFAULTS",
    "PROTOCOLS",
    "JobSpec",
    "PartySpec",
    "load_spec",
    "parse_spec",
]
