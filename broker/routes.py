"""route_table.json: where messages for each party go.

Format (OSX's)::

    {"route_table": {
        "bob":   {"default": [{"ip": "10.0.0.2", "port": 9370}]},          # peer broker, gRPC
        "carol": {"default": [{"protocol": "http",
                               "url": "https://10.0.0.3:9443/v1/interconn/chan/invoke",
                               "useSSL": true, "caFile": "ca.crt", ...}]},
        "alice": {"fateflow": [{"ip": "127.0.0.1", "port": 9360}]},       # self entry, not a route
        "default": {"default": [{"ip": "hub", "port": 9370}]}},           # catch-all (exchange)
     "self_party": ["alice"]}

A party's ``default`` list gives the next hop; the first entry is tried first and the others
on failure. Relative certificate paths resolve against the folder of the route table.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import RouteError

DEFAULT_PARTY = "default"

# "permission" is OSX's; it means nothing to this broker.
_TOP_KEYS = ("route_table", "self_party", "permission")

_ROUTE_KEYS = {
    "ip",
    "port",
    "protocol",
    "url",
    "useSSL",
    "certChainFile",
    "privateKeyFile",
    "caFile",
    "negotiationType",
    "token",
}
# OSX's Java keystore variant: accepted (so an OSX table loads) but unusable here.
_KEYSTORE_KEYS = {
    "useKeyStore",
    "keyStoreFile",
    "keyStorePassword",
    "trustStoreFile",
    "trustStorePassword",
}

# Turns a route key's JSON value into a Route field, or raises ValueError with the problem.
Parser = Callable[[object], object]


@dataclass(frozen=True)
class Route:
    """One next hop: a peer broker's gRPC port, or its HTTP ``invoke`` URL."""

    party: str
    protocol: str  # "grpc" or "http"
    ip: str | None = None
    port: int | None = None
    url: str | None = None
    use_ssl: bool = False
    cert_chain_file: str | None = None
    private_key_file: str | None = None
    ca_file: str | None = None
    token: str | None = field(default=None, repr=False)  # sent as x-ptp-token on this route

    @property
    def target(self) -> str:
        """Where this route points, for logs (``ip:port`` or the URL)."""
        return self.url if self.protocol == "http" else f"{self.ip}:{self.port}"


@dataclass(frozen=True)
class RouteTable:
    """A validated route table; immutable, replaced whole on reload."""

    routes: dict[str, tuple[Route, ...]]
    self_parties: frozenset[str]
    source: str = ""
    warnings: tuple[str, ...] = field(default=())

    def is_self(self, party: str) -> bool:
        return party in self.self_parties

    def lookup(self, party: str) -> tuple[Route, ...]:
        """Next hops for ``party``: its own entry, else the ``default`` catch-all."""
        hops = self.routes.get(party)
        if hops:
            return hops
        return self.routes.get(DEFAULT_PARTY, ())

    def knows(self, party: str) -> bool:
        """Whether ``party`` is named in the table (self, or with a route of its own)."""
        return party in self.self_parties or party in self.routes


def parse_route_table(text: str, source: str = "route_table.json") -> RouteTable:
    """Parse and validate route-table JSON; raise RouteError listing every problem."""
    doc = _json_object(text, source)
    problems = [
        f"{key}: unknown key (expected route_table, self_party)"
        for key in doc
        if key not in _TOP_KEYS
    ]
    warnings: list[str] = []
    self_parties = _parse_self_party(doc.get("self_party"), problems)
    routes = _parse_routes(
        doc.get("route_table"), self_parties, Path(source).parent, problems, warnings
    )
    if problems:
        raise RouteError(source, problems)
    return RouteTable(
        routes=routes, self_parties=self_parties, source=source, warnings=tuple(warnings)
    )


def _json_object(text: str, source: str) -> dict[str, object]:
    """The top-level object of ``text``; a RouteError of its own when there is none."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RouteError(
            source, [f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
        ) from None
    if not isinstance(doc, dict):
        raise RouteError(source, ["the top level must be a JSON object"])
    return doc


def _parse_self_party(value: object, problems: list[str]) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        problems.append('self_party: required, a list of this broker\'s party ids, e.g. ["alice"]')
        return frozenset()
    parties = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (str, int)) or str(item) == "":
            problems.append(f"self_party: {item!r} is not a party id")
        else:
            parties.append(str(item))
    return frozenset(parties)


def _parse_routes(
    table: object,
    self_parties: frozenset[str],
    base: Path,
    problems: list[str],
    warnings: list[str],
) -> dict[str, tuple[Route, ...]]:
    """``route_table``: each party with a usable ``default`` list, to its next hops."""
    if not isinstance(table, dict):
        problems.append("route_table: required, an object of party -> {role: [route, ...]}")
        return {}
    routes = {}
    for party, roles in table.items():
        hops = _parse_party(party, roles, party in self_parties, base, problems, warnings)
        if hops:
            routes[party] = hops
    return routes


def _parse_party(
    party: str,
    roles: object,
    is_self: bool,
    base: Path,
    problems: list[str],
    warnings: list[str],
) -> tuple[Route, ...]:
    """One party's next hops, from its ``default`` list; any other role is warned about."""
    path = f"route_table.{party}"
    if not isinstance(roles, dict):
        problems.append(f"{path}: must be an object of role -> [route, ...]")
        return ()
    hops: tuple[Route, ...] = ()
    for role, entries in roles.items():
        if is_self and role != "default":
            continue  # a self entry (e.g. OSX's "fateflow"): not a route to a peer
        if not isinstance(entries, list) or not entries:
            problems.append(f"{path}.{role}: must be a non-empty list of routes")
        elif role != "default":
            warnings.append(f"{path}.{role}: only 'default' routes are used; ignored")
        else:
            parsed = [
                _parse_route(party, entry, f"{path}.{role}[{i}]", base, problems)
                for i, entry in enumerate(entries)
            ]
            hops = tuple(route for route in parsed if route is not None)
    return hops


def _parse_route(
    party: str, entry: object, path: str, base: Path, problems: list[str]
) -> Route | None:
    """One entry of a ``default`` list; None, its problems added, when it cannot be used."""
    if not isinstance(entry, dict):
        problems.append(f"{path}: must be an object")
        return None
    before = len(problems)
    problems.extend(_key_problems(entry, path))
    values = _parse_fields(entry, _optional_fields(base), path, problems)
    target = _parse_target(entry, path, problems)
    if target is None or len(problems) > before:
        return None
    values.update(target)
    if values["protocol"] == "http" and urlsplit(values["url"]).scheme == "https":
        values["use_ssl"] = True  # an https URL means TLS, whatever useSSL says
    return Route(party=party, **values)


def _key_problems(entry: dict[str, object], path: str) -> list[str]:
    """Keys a route may not have: unknown ones, and a Java keystore in use."""
    problems = [
        f"{path}.{key}: unknown key"
        for key in entry
        if key not in _ROUTE_KEYS and key not in _KEYSTORE_KEYS
    ]
    if entry.get("useKeyStore") is True:
        problems.append(
            f"{path}.useKeyStore: Java keystores are not supported; "
            "use certChainFile, privateKeyFile and caFile (PEM)"
        )
    return problems


def _parse_target(
    entry: dict[str, object], path: str, problems: list[str]
) -> dict[str, object] | None:
    """The protocol and where it points (its keys depend on the protocol); None if unknown."""
    protocol = str(entry.get("protocol", "grpc")).lower()
    fields = _TARGET_FIELDS.get(protocol)
    if fields is None:
        problems.append(f"{path}.protocol: must be grpc or http, got {protocol!r}")
        return None
    return {"protocol": protocol, **_parse_fields(entry, fields, path, problems, required=True)}


def _parse_fields(
    entry: dict[str, object],
    fields: dict[str, tuple[str, Parser]],
    path: str,
    problems: list[str],
    *,
    required: bool = False,
) -> dict[str, object]:
    """``{Route field: value}`` for the keys of ``fields``, in order, each through its parser.

    A parser's ValueError becomes the problem ``path.key: message``. An optional key that is
    absent is left out (Route's default applies); a required one reaches its parser as None.
    """
    values: dict[str, object] = {}
    for key, (name, parse) in fields.items():
        if key not in entry and not required:
            continue
        try:
            values[name] = parse(entry.get(key))
        except ValueError as exc:
            problems.append(f"{path}.{key}: {exc}")
    return values


def _optional_fields(base: Path) -> dict[str, tuple[str, Parser]]:
    """Keys any route may have: key -> (Route field, parser); PEM paths are taken against base."""
    pem_file = functools.partial(_pem_file, base=base)
    return {
        "useSSL": ("use_ssl", _flag),
        "token": ("token", _token),
        "certChainFile": ("cert_chain_file", pem_file),
        "privateKeyFile": ("private_key_file", pem_file),
        "caFile": ("ca_file", pem_file),
    }


# Field parsers: each returns the value for Route or raises ValueError with the problem.


def _flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _token(value: object) -> str | None:
    if value is None or (isinstance(value, str) and value):
        return value
    raise ValueError("must be a non-empty string")


def _pem_file(value: object, base: Path) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError("must be a file path")
    path = Path(os.path.expanduser(value))
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise ValueError(f"file not found: {path}")
    return str(path)


def _host(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("required, the peer broker's host")
    return value


def _grpc_port(value: object) -> int:
    port = value
    if isinstance(value, str) and value.isdigit():  # also taken as text: "9370"
        try:
            port = int(value)
        except ValueError:  # a digit int() does not read ("²"), or thousands of digits
            port = None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError("required, the peer broker's gRPC port (1-65535)")
    return port


def _invoke_url(value: object) -> str:
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:  # e.g. an IPv6 host without its closing "]"
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            "an http route needs a url such as http://10.0.0.2:9380/v1/interconn/chan/invoke"
        )
    return value


# Where a route points, by protocol: key -> (Route field, parser); every key is required.
_TARGET_FIELDS: dict[str, dict[str, tuple[str, Parser]]] = {
    "grpc": {"ip": ("ip", _host), "port": ("port", _grpc_port)},
    "http": {"url": ("url", _invoke_url)},
}


def load_route_table(path: Path) -> RouteTable:
    """Read and validate a route-table file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RouteError(str(path), ["file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RouteError(str(path), [f"cannot read the file: {exc}"]) from None
    return parse_route_table(text, str(path))


class RouteTableFile:
    """The route table of a running broker, re-read when the file changes.

    A changed file that does not parse or validate leaves the table in use untouched;
    ``reload_if_changed`` reports the outcome so the caller can log it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.table = load_route_table(path)
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def reload_if_changed(self) -> tuple[str, str | None]:
        """Return ("unchanged"|"reloaded"|"rejected", detail)."""
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return "unchanged", None
        self._stamp = stamp
        try:
            table = load_route_table(self.path)
        except RouteError as exc:
            return "rejected", str(exc)
        self.table = table
        return "reloaded", None
