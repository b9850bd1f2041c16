"""What key normalisation and the result agreement check cost, per step, in one process.

    .venv/bin/python bench/bench_normalize.py --rows 10000000 --phone-rows 1000000

Each step runs alone on a generated column of ``--rows`` values (``e164`` on
``--phone-rows``, scaled to ``--rows``, since it parses each value in Python), through the
same functions a job uses (``psi_runner.normalize``). Steps that can use worker processes
(``e164``, ``sha256``) are timed in one process and with the pool. The agreement check is timed
as a job at the receiving side pays it: reading the result keys of a plain file, or taking the
result rows' keys, and the keyed digest over them. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from psi_runner import agreement, data, normalize, phones
from psi_runner.keyspec import Step
from psi_runner.workers import cores


def _column(kind: str, n: int, seed: int) -> pa.Array:
    rng = random.Random(seed)
    ids = rng.sample(range(10**9), n)
    if kind == "email":
        return pa.array([f"  User.{i}@Example.com " for i in ids], pa.large_string())
    if kind == "cjk":  # names in CJK and full-width characters: nfkc's Python path
        return pa.array([f"张{i % 1000}ＡＢ{i}" for i in ids], pa.large_string())
    if kind == "phone":
        formats = ("+86 138-{a}-{b}", "138{a}{b}", "0086 138 {a} {b}", "(+86) 138 {a} {b}")
        return pa.array(
            [
                formats[i % 4].format(a=f"{i // 10**4 % 10**4:04d}", b=f"{i % 10**4:04d}")
                for i in ids
            ],
            pa.large_string(),
        )
    return pa.array([f"{i:09d}" for i in ids], pa.large_string())


def _time(fn, column, *args) -> float:
    """Seconds of ``fn(column, *args)``, after a warm-up call on a small slice (the first call
    of a kernel pays one-off set-up costs that a job pays once, not per column)."""
    fn(column.slice(0, 1000), *args)
    t = time.perf_counter()
    fn(column, *args)
    return time.perf_counter() - t


def _steps(
    rows: int, phone_rows: int, seed: int, only: set[str]
) -> list[tuple[str, str, float, int]]:
    """(step, column, seconds, rows measured); ``only``: these steps (empty: all)."""
    if only:
        email = _column("email", rows, seed)
        return [(n, "ASCII e-mail", _time(normalize.apply_steps, email, (Step(n),)), rows)
                for n in sorted(only)]  # fmt: skip
    out = []
    email = _column("email", rows, seed)
    for name in ("trim", "lower", "upper", "collapse_spaces", "digits_only", "nfkc"):
        out.append((name, "ASCII e-mail", _time(normalize.apply_steps, email, (Step(name),)), rows))
    out.append(
        ("email", "ASCII e-mail", _time(normalize.apply_steps, email, (Step("email"),)), rows)
    )
    gmail = (Step("email", gmail=True),)
    out.append(("email(gmail)", "ASCII e-mail", _time(normalize.apply_steps, email, gmail), rows))
    out.append(("sha256, 1 process", "ASCII e-mail",
                _time(normalize.sha256_hex, email, None, 1), rows))  # fmt: skip
    if cores() > 1:
        out.append((f"sha256, {cores()} processes", "ASCII e-mail",
                    _time(normalize.sha256_hex, email, None, cores()), rows))  # fmt: skip
    hexes = normalize.sha256_hex(email, None, 1)
    out.append(("prehashed sha256_hex", "64 hex digits",
                _time(normalize.prehashed_column, hexes, "sha256_hex"), rows))  # fmt: skip
    del email, hexes
    cjk = _column("cjk", rows, seed)
    out.append(
        ("nfkc", "CJK + full-width", _time(normalize.apply_steps, cjk, (Step("nfkc"),)), rows)
    )
    del cjk
    phone = _column("phone", phone_rows, seed)
    out.append(("e164(region=CN), 1 process", "phone, 4 formats",
                _time(phones.e164_column, phone, "CN", 1), phone_rows))  # fmt: skip
    if cores() > 1:
        out.append((f"e164(region=CN), {cores()} processes", "phone, 4 formats",
                    _time(phones.e164_column, phone, "CN", cores()), phone_rows))  # fmt: skip
    return out


def _agreement(rows: int, seed: int, folder: Path) -> list[tuple[str, float]]:
    """The receiving side's extra work for the check on a result of ``rows`` rows."""
    keys = _column("id", rows, seed)
    out_file = folder / "spu_output.csv"
    pcsv.write_csv(pa.table({"uid": keys, "x": keys}), out_file)
    t = time.perf_counter()
    read = data.read_result_keys(out_file, ("uid",))
    digest_key = agreement.digest_key("a", "b")
    agreement.keys_digest([read["uid"]], digest_key)
    plain = time.perf_counter() - t
    positions = np.random.default_rng(seed).permutation(rows).astype(np.int64)
    table = pa.table({"uid": keys})
    t = time.perf_counter()
    index = pa.Int64Array.from_buffers(pa.int64(), rows, [None, pa.py_buffer(positions)])
    taken = table.take(index)
    agreement.keys_digest([taken["uid"]], digest_key)
    canonical = time.perf_counter() - t
    return [
        ("plain file: read the result's key column + digest", plain),
        ("canonical keys: take the result rows' keys + digest", canonical),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--phone-rows", type=int, default=1_000_000)
    parser.add_argument("--result-rows", type=int, help="rows of the result (default: rows/2)")
    parser.add_argument("--only", default="", help="comma-separated steps to time (on e-mails)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    result_rows = args.result_rows or args.rows // 2
    scale = 10_000_000
    print(f"rows {args.rows:,}, phone rows {args.phone_rows:,}, cores {cores()}")
    print("\n| step | column | rows timed | seconds | seconds per 10M rows |")
    print("| --- | --- | --- | --- | --- |")
    only = {s for s in args.only.split(",") if s and s != "agreement"}
    for name, column, seconds, n in _steps(args.rows, args.phone_rows, args.seed, only):
        print(f"| `{name}` | {column} | {n:,} | {seconds:.2f} | {seconds * scale / n:.1f} |")
    with tempfile.TemporaryDirectory() as folder:
        print("\n| agreement check (receiving side) | result rows | seconds |")
        print("| --- | --- | --- |")
        for what, seconds in _agreement(result_rows, args.seed, Path(folder)):
            print(f"| {what} | {result_rows:,} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
