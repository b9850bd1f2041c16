"""route_table.json: where messages for each party go.

Format (OSX's)::

    {"route_table": {
        "bob":   {"default": [{"ip": "10.0.0.2", "port": 9370}]},            # peer broker, gRPC
        "carol": {"default": [{"protocol": "http",
                               "url": "https://10.0.0.3:9443/v1/interconn/chan/invoke",
                               "useSSL": true, "caFile": "ca.crt", ...}]},
        "alice": {"fateflow": [{"ip": "127.0.0.1", "port": 9360}]},         # self entry, not a route
        "default": {"default": [{"ip": "hub", "port": 9370}]}},             # catch-all (exchange)
     "self_party": ["alice"]}

A party's ``default`` list gives the next hop; the first entry is tried first and the others
on failure. Relative certificate paths resolve against the folder of the route table.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import RouteError

DEFAULT_PARTY = "default"

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
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RouteError(
            source, [f"not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"]
        ) from None
    problems: list[str] = []
    warnings: list[str] = []
    if not isinstance(doc, dict):
        raise RouteError(source, ["the top level must be a JSON object"])
    for key in doc:
        if key not in ("route_table", "self_party", "permission"):
            problems.append(f"{key}: unknown key (expected route_table, self_party)")

    self_parties = _parse_self_party(doc.get("self_party"), problems)
    table = doc.get("route_table")
    routes: dict[str, tuple[Route, ...]] = {}
    if not isinstance(table, dict):
        problems.append("route_table: required, an object of party -> {role: [route, ...]}")
        table = {}
    base = Path(source).parent
    for party, roles in table.items():
        path = f"route_table.{party}"
        if not isinstance(roles, dict):
            problems.append(f"{path}: must be an object of role -> [route, ...]")
            continue
        for role, entries in roles.items():
            if party in self_parties and role != "default":
                continue  # a self entry (e.g. OSX's "fateflow"): not a route to a peer
            if not isinstance(entries, list) or not entries:
                problems.append(f"{path}.{role}: must be a non-empty list of routes")
                continue
            if role != "default":
                warnings.append(f"{path}.{role}: only 'default' routes are used; ignored")
                continue
            hops = []
            for i, entry in enumerate(entries):
                route = _parse_route(party, entry, f"{path}.{role}[{i}]", base, problems, warnings)
                if route is not None:
                    hops.append(route)
            if hops:
                routes[party] = tuple(hops)
    if problems:
        raise RouteError(source, problems)
    return RouteTable(
        routes=routes, self_parties=self_parties, source=source, warnings=tuple(warnings)
    )


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


def _parse_route(
    party: str, entry: object, path: str, base: Path, problems: list[str], warnings: list[str]
) -> Route | None:
    if not isinstance(entry, dict):
        problems.append(f"{path}: must be an object")
        return None
    for key in entry:
        if key in _KEYSTORE_KEYS:
            continue
        if key not in _ROUTE_KEYS:
            problems.append(f"{path}.{key}: unknown key")
    if entry.get("useKeyStore") is True:
        problems.append(
            f"{path}.useKeyStore: Java keystores are not supported; "
            "use certChainFile, privateKeyFile and caFile (PEM)"
        )
    protocol = str(entry.get("protocol", "grpc")).lower()
    use_ssl = entry.get("useSSL", False)
    if not isinstance(use_ssl, bool):
        problems.append(f"{path}.useSSL: must be true or false")
        use_ssl = False
    token = entry.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        problems.append(f"{path}.token: must be a non-empty string")
        token = None
    files = {}
    for key in ("certChainFile", "privateKeyFile", "caFile"):
        value = entry.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            problems.append(f"{path}.{key}: must be a file path")
            continue
        p = Path(os.path.expanduser(value))
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            problems.append(f"{path}.{key}: file not found: {p}")
        files[key] = str(p)
    if protocol == "http":
        url = entry.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            problems.append(
                f"{path}.url: an http route needs a url such as "
                "http://10.0.0.2:9380/v1/interconn/chan/invoke"
            )
            return None
        return Route(
            party=party,
            protocol="http",
            url=url,
            use_ssl=use_ssl or parts.scheme == "https",
            cert_chain_file=files.get("certChainFile"),
            private_key_file=files.get("privateKeyFile"),
            ca_file=files.get("caFile"),
            token=token,
        )
    if protocol != "grpc":
        problems.append(f"{path}.protocol: must be grpc or http, got {protocol!r}")
        return None
    ip, port = entry.get("ip"), entry.get("port")
    ok = True
    if not isinstance(ip, str) or not ip:
        problems.append(f"{path}.ip: required, the peer broker's host")
        ok = False
    if isinstance(port, str) and port.isdigit():
        port = int(port)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        problems.append(f"{path}.port: required, the peer broker's gRPC port (1-65535)")
        ok = False
    if not ok:
        return None
    return Route(
        party=party,
        protocol="grpc",
        ip=ip,
        port=port,
        use_ssl=use_ssl,
        cert_chain_file=files.get("certChainFile"),
        private_key_file=files.get("privateKeyFile"),
        ca_file=files.get("caFile"),
        token=token,
    )


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
