"""Exception tree of the broker.

    BrokerError                 root; the CLI turns it into one line and exit code 2
    ├── ConfigError             broker.properties is missing, unreadable or invalid
    └── RouteError              route_table.json is missing, unparsable or invalid

Errors carry every problem found (``problems``), each prefixed with its key path,
so that an operator can fix a file in one pass.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""


class ConfigError(BrokerError):
    """broker.properties cannot be used."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__(f"{path}: " + "; ".join(self.problems))


class RouteError(BrokerError):
    """route_table.json cannot be used."""

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__(f"{path}: " + "; ".join(self.problems))
