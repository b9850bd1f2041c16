"""The spec form of a PostgreSQL input or output (``parties.<p>.input`` / ``output`` as a
mapping); reading and writing is ``database``'s. A ``DbConfig`` never holds a password: the
spec names where the password is (an environment variable or a 0600 file), and a URL that
holds one is refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import cut, shown

_KEYS = {"postgres", "table", "query", "password_env", "password_file"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]{0,62}")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
QUERY_MAX = 100_000  # characters of a query in the spec


@dataclass(frozen=True)
class DbConfig:
    """A PostgreSQL table or query (input) or table (output); never holds a password."""

    url: str
    table: str | None = None  # "name" or "schema.name"
    query: str | None = None
    password_env: str | None = None
    password_file: Path | None = None

    def describe(self) -> str:
        """For messages and the report: the URL (no password) and the table, or "query"."""
        what = f"table {self.table}" if self.table else "query"
        return f"postgres {cut(self.url, 80)} {what}"

    def __str__(self) -> str:
        return self.describe()


def parse_config(
    value: dict[Any, Any], base: Path, path: str, problems: list[str], output: bool
) -> DbConfig | None:
    """A ``DbConfig`` from the spec's mapping; every problem is appended with its key path."""
    before = len(problems)
    for key in value:
        if key not in _KEYS or (output and key == "query"):
            allowed = ", ".join(sorted(_KEYS - ({"query"} if output else set())))
            problems.append(f"{path}.{shown(key, 20)[1:-1]}: unknown key (allowed: {allowed})")
    url = _url(value.get("postgres"), path, problems)
    table, query = value.get("table"), value.get("query")
    if table is not None and (not isinstance(table, str) or not _table_name_ok(table)):
        problems.append(
            f"{path}.table: must be a table name or schema.table (letters, digits, _ and $), "
            f"got {shown(table)}"
        )
    if query is not None and (
        not isinstance(query, str) or not query.strip() or len(query) > QUERY_MAX
    ):
        problems.append(f"{path}.query: must be a SELECT statement (at most {QUERY_MAX} chars)")
    if output and table is None:
        problems.append(f"{path}.table: required, the table the result goes to")
    if not output and (table is None) == (query is None):
        problems.append(f"{path}: give exactly one of table and query")
    env, file_path = _password_source(value, base, path, problems)
    if len(problems) > before or url is None:
        return None
    return DbConfig(url, table, query.strip() if isinstance(query, str) else None, env, file_path)


def _url(url: Any, path: str, problems: list[str]) -> str | None:
    if not isinstance(url, str) or not url.strip():
        problems.append(f"{path}.postgres: required, a postgresql:// URL (without a password)")
        return None
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        problems.append(f"{path}.postgres: must start with postgresql://")
    elif parts.password is not None or re.search(r"(^|&)password=", parts.query):
        problems.append(
            f"{path}.postgres: holds a password; remove it from the spec and use "
            "password_env or password_file"
        )
    elif any(ord(c) < 32 or ord(c) == 127 for c in url):
        problems.append(f"{path}.postgres: holds a control character")
    return url


def _password_source(
    value: dict[Any, Any], base: Path, path: str, problems: list[str]
) -> tuple[str | None, Path | None]:
    env, pw_file = value.get("password_env"), value.get("password_file")
    if env is not None and (not isinstance(env, str) or not _ENV.fullmatch(env)):
        problems.append(f"{path}.password_env: must be an environment variable's name")
    if env is not None and pw_file is not None:
        problems.append(f"{path}: give at most one of password_env and password_file")
    if pw_file is None:
        return env, None
    if not isinstance(pw_file, str) or not pw_file.strip() or "\0" in pw_file:
        problems.append(f"{path}.password_file: must be a file path")
        return env, None
    p = Path(pw_file.strip()).expanduser()
    return env, (p if p.is_absolute() else base / p)


def _table_name_ok(name: str) -> bool:
    parts = name.split(".")
    return 1 <= len(parts) <= 2 and all(_NAME.fullmatch(p) for p in parts)
