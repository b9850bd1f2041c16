"""Unbalanced PSI (``protocol: ECDH_OPRF_UB``): the spec's ``unbalanced`` block, and what the
two parties agree on about their caches before any SPU link.

SPU's unbalanced PSI (ECDH-OPRF, curve FourQ, fixed by SPU) splits the work in two phases:

* **offline**, once per version of the large party's input: the *server* (the large party)
  evaluates its keys under a secret OPRF key of its own and keeps the result as its cache
  (``psi-run SPEC --party SERVER --offline``, no peer needed);
* **online**, for every job: the *client* (the small party) sends its blinded keys, the server
  evaluates them, and the client compares them with its copy of the server's evaluated keys.
  The copy is sent to a client once (in its first online job with this version of the cache)
  and reused after that.

The spec names the server and each party's cache folder::

    protocol: ECDH_OPRF_UB
    unbalanced:
      server: bob
      cache: {alice: /data/ub/alice, bob: /data/ub/bob}

In the handshake each side offers what its cache holds (``offer``; the server: the identity of
its cache and whether it is usable; the client: which server cache its copy is of), and both
decide the same from the two offers (``agree``): refuse a server cache that is missing, stale
or built for other keys (both sides stop, naming the server and the fix), or run, sending the
client a fresh copy first when it holds none of this cache. Only problem codes cross the
brokers; each side words the sentence itself. The folders themselves are ``cache``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CacheError, key_text, shown

if TYPE_CHECKING:
    from .spec import JobSpec

PROTOCOL = "ECDH_OPRF_UB"
_KEYS = {"server", "cache"}


@dataclass(frozen=True)
class UnbalancedSpec:
    """The large party (SPU's server) and each party's cache folder (local to that party)."""

    server: str
    cache: dict[str, Path]

    def client_of(self, parties: list[str]) -> str:
        return next(p for p in parties if p != self.server)


def parse_unbalanced(
    value: Any,
    base: Path,
    parse_path: Callable[[Any, Path, str, list[str]], Path | None],
    problems: list[str],
) -> UnbalancedSpec | None:
    """The ``unbalanced`` block, or None when absent or bad (the problems say why)."""
    if value is None:
        return None
    example = "e.g. unbalanced: {server: bob, cache: {alice: /data/ub/alice, bob: /data/ub/bob}}"
    if not isinstance(value, dict):
        problems.append(f"unbalanced: must be a mapping with server and cache, {example}")
        return None
    ok = True
    for key in value:
        if key not in _KEYS:
            problems.append(f"unbalanced.{key_text(key)}: unknown key (allowed: cache, server)")
            ok = False
    server = value.get("server")
    if isinstance(server, int) and not isinstance(server, bool):
        server = str(server)
    if not isinstance(server, str) or not server:
        problems.append(f"unbalanced.server: required, the party with the large set, {example}")
        ok = False
    caches = value.get("cache")
    paths: dict[str, Path] = {}
    if not isinstance(caches, dict) or not caches:
        problems.append(f"unbalanced.cache: required, a cache folder for each party, {example}")
        return None
    for raw, folder in caches.items():
        name = str(raw) if isinstance(raw, (int, str)) and not isinstance(raw, bool) else None
        if name is None:
            problems.append(f"unbalanced.cache.{key_text(raw)}: must be a party's name")
            ok = False
            continue
        path = parse_path(folder, base, f"unbalanced.cache.{key_text(name)}", problems)
        if path is None:
            ok = False
        else:
            paths[name] = path
    if not ok:
        return None
    return UnbalancedSpec(server=str(server), cache=paths)


def unbalanced_rules(values: dict[str, Any], doc: dict[Any, Any]) -> Iterator[str]:
    """What an unbalanced job must fit (and what only an unbalanced job may hold)."""
    ub: UnbalancedSpec | None = values["unbalanced"]
    if values["protocol"] != PROTOCOL:
        if "unbalanced" in doc:
            yield (
                f"unbalanced: only applies to protocol {PROTOCOL}; remove it or set "
                f"protocol: {PROTOCOL}"
            )
        return
    if "unbalanced" not in doc:
        yield (
            f"unbalanced: required with protocol {PROTOCOL}: name the large party and each "
            "party's cache folder, e.g. unbalanced: {server: bob, cache: {alice: "
            "/data/ub/alice, bob: /data/ub/bob}}"
        )
    if values["backend"] != "embedded":
        yield (
            f"backend: protocol {PROTOCOL} runs with backend: embedded only (psi-run does not "
            "route SecretFlow's unbalanced call through the brokers); set backend: embedded"
        )
    if values["api"] != "psi":
        yield f"api: protocol {PROTOCOL} needs api: psi; remove api: psi_csv"
    if values["join"] != "inner":
        yield (
            f"join: protocol {PROTOCOL} computes the intersection only; remove join: "
            f"{values['join']}"
        )
    if values["allow_duplicate_keys"]:
        yield (
            f"allow_duplicate_keys: protocol {PROTOCOL} needs unique keys; deduplicate the "
            "input or use another protocol"
        )
    if values["shards"] != 1:
        yield f"shards: protocol {PROTOCOL} is not sharded; remove shards"
    if ub is not None:
        yield from _block_fits_parties(ub, values["parties"])


def _block_fits_parties(ub: UnbalancedSpec, parties: dict[str, Any]) -> Iterator[str]:
    if parties and ub.server not in parties:
        yield (
            f"unbalanced.server: {shown(ub.server)} is not one of the parties "
            f"({', '.join(parties)})"
        )
    for name in parties:
        if name not in ub.cache:
            yield (
                f"unbalanced.cache.{name}: required, the folder where {name} keeps its cache "
                "(created 0700 if absent)"
            )
    for name in ub.cache:
        if parties and name not in parties:
            yield (
                f"unbalanced.cache.{key_text(name)}: not one of the parties ({', '.join(parties)})"
            )
    folders = list(ub.cache.values())
    if len(folders) == 2 and folders[0] == folders[1]:
        yield "unbalanced.cache: the two parties need folders of their own; give two paths"
    for name, party in parties.items():
        folder = ub.cache.get(name)
        files = [p for p in (party.input, party.output) if isinstance(p, Path)]
        if folder is not None and any(f == folder or folder in f.parents for f in files):
            yield (
                f"unbalanced.cache.{name}: must not be or hold {name}'s input or output "
                "(psi-run replaces the whole folder); choose a folder of its own"
            )


def fields(spec: JobSpec) -> dict[str, object]:
    """The spec fields a server cache depends on (not the job id, the client or the paths:
    one cache serves any number of jobs with any partner)."""
    from .digest import key_rules

    ub = spec.unbalanced
    assert ub is not None
    rules = key_rules(spec)
    prehashed = rules.get("prehashed") or {}
    rules["prehashed"] = prehashed.get(ub.server, {}) if isinstance(prehashed, dict) else {}
    return {"protocol": spec.protocol, "keys": list(spec.keys), **rules}


# -- what the two sides agree on -----------------------------------------------------------

# Problem codes of a server cache (they cross the brokers; each side words the sentence).
SERVER_PROBLEMS = {
    "missing": "has no cache yet",
    "foreign": "has a cache folder that holds something else than its cache",
    "damaged": "has a damaged cache (files missing or of another size)",
    "version": "has a cache built by another SPU version",
    "fields": "has a cache built for other keys or key rules",
    "stale": "has a stale cache: its input changed since the cache was built",
}
CLIENT_PROBLEMS = {
    "foreign": "has a cache folder that holds something else than a copy of the server's "
    "cache (another party's cache or other files)",
}


@dataclass(frozen=True)
class UbPlan:
    """What the online job does: whether the client receives a copy of the cache first."""

    server: str
    client: str
    cache_id: str
    rows: int
    transfer: bool


def agree(spec: JobSpec, me: str, mine: dict, theirs: dict, detail: str = "") -> UbPlan:
    """The same decision at both sides, from both offers; CacheError when one side's cache
    cannot be used (both sides stop before any SPU link). ``detail`` adds, to this side's own
    refusal only, what it found (it never crosses the brokers)."""
    ub = spec.unbalanced
    assert ub is not None
    client = ub.client_of(spec.party_names)
    server_offer, client_offer = (mine, theirs) if me == ub.server else (theirs, mine)
    for party, offer, known in (
        (ub.server, server_offer, SERVER_PROBLEMS),
        (client, client_offer, CLIENT_PROBLEMS),
    ):
        code = str(offer.get("problem", ""))
        if code:
            raise CacheError(
                problem_text(spec, party, code, known, detail if party == me else ""),
                from_peer=party != me,
            )
    cache_id = str(server_offer.get("id", ""))
    if not cache_id:  # a server of another psi-run version, or no offer at all
        raise CacheError(
            f"job {spec.job_id}: {ub.server} told nothing of its unbalanced cache; run the "
            "same psi-run version at both sides"
        )
    rows = server_offer.get("rows")
    return UbPlan(
        server=ub.server,
        client=client,
        cache_id=cache_id,
        rows=rows if isinstance(rows, int) else -1,
        transfer=client_offer.get("holds") != cache_id,
    )


def problem_text(spec: JobSpec, party: str, code: str, known: dict, detail: str = "") -> str:
    """One sentence: the party, what is wrong with its cache, and the fix."""
    ub = spec.unbalanced
    assert ub is not None
    what = known.get(code, "has an unusable cache")
    why = f" ({detail})" if detail else ""
    if party == ub.server:
        fix = f"run `psi-run {spec.path.name} --party {party} --offline` at {party} first"
        if code == "foreign":
            fix = (
                f"point unbalanced.cache.{party} at an empty folder or at {party}'s cache, then "
                f"run `psi-run {spec.path.name} --party {party} --offline`"
            )
    else:
        fix = f"point unbalanced.cache.{party} at an empty folder or at {party}'s earlier copy"
    return f"job {spec.job_id}: {party} {what}{why}; {fix}"
