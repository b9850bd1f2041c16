"""Exit codes are declared once, in the error tree, and documented from there."""

from __future__ import annotations

import re
from pathlib import Path

from psi_runner import errors

ROOT = Path(__file__).resolve().parent.parent


def test_readme_exit_code_table_is_the_error_tree():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    table = text[text.index("| code | meaning |") :].split("\n\n", 1)[0]
    rows = [tuple(c.strip() for c in line.strip("|").split("|")) for line in table.splitlines()[2:]]
    assert [(int(code), meaning) for code, meaning in rows] == errors.exit_codes()


def test_every_error_class_has_its_own_exit_code():
    codes = [code for code, _ in errors.exit_codes()]
    assert len(codes) == len(set(codes))
    assert {0, 2, 3, 4, 5, 6, 130} <= set(codes)


def test_no_exit_code_literal_where_the_process_ends():
    """No ``return 3``, ``os._exit(6)`` or ``EXIT_X = 4`` where psi-run decides its exit code:
    every code comes from ``errors``."""
    pattern = re.compile(r"\b(return|_exit\(|exit\(|EXIT_\w+ =)\s*([1-9]\d*)\b")
    offenders = []
    for name in ("cli.py", "supervisor.py", "job.py", "interrupts.py", "watchdog.py"):
        lines = (ROOT / "psi_runner" / name).read_text(encoding="utf-8").splitlines()
        for n, line in enumerate(lines, 1):
            if pattern.search(line.split("#", 1)[0]):
                offenders.append(f"{name}:{n}: {line.strip()}")
    assert offenders == []
