"""Benchmark: several jobs at once through one broker pair, against the same jobs in a row.

``--jobs`` jobs (different job ids, N x N rows each, half shared, RR22) through two local
brokers: first one after the other, then all at once; prints both walls and their ratio, and
checks every result's row count against the shared ids the data was built with.

    .venv/bin/python bench/bench_jobs.py --jobs 4 --rows 200000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_spec  # noqa: E402

from harness.localnet import psi_run_command, start_pair  # noqa: E402


def make_data(folder: Path, rows: int, seed: int) -> int:
    """Two inputs of ``rows`` ids sharing half of them; the number shared."""
    rng = np.random.default_rng(seed)
    pool = rng.choice(10**10, size=2 * rows - rows // 2, replace=False)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, ids in (("alice", pool[:rows]), ("bob", pool[rows - rows // 2 :])):
        with open(folder / f"data/{name}.csv", "w") as fh:
            fh.write("uid\n" + "\n".join(f"id{v:010d}" for v in ids.tolist()) + "\n")
    return rows // 2


def start(spec: Path) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            psi_run_command(spec, p, None, "--progress", "none"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in ("alice", "bob")
    ]


def finish(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            sys.exit(f"a run failed ({proc.returncode}): {err.strip()}")


def check(folder: Path, shared: int) -> None:
    for party in ("alice", "bob"):
        with open(folder / f"out/{party}_psi.csv") as fh:
            rows = sum(1 for _ in fh) - 1
        if rows != shared:
            sys.exit(f"{folder.name}: {party} got {rows} rows, expected {shared}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--protocol", default="RR22")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-jobs-") as tmp:
        root = Path(tmp)
        pair = start_pair(root / "brokers")
        try:
            specs, shared = [], 0
            for i in range(args.jobs):
                folder = root / f"job{i}"
                shared = make_data(folder, args.rows, seed=i)
                specs.append(write_spec(folder, pair, job_id=f"bench-{i}", protocol=args.protocol))
            t = time.monotonic()
            for spec in specs:
                finish(start(spec))
            in_a_row = time.monotonic() - t
            for spec in specs:
                check(spec.parent, shared)
                for party in ("alice", "bob"):
                    (spec.parent / f"out/{party}_psi.csv").unlink()
            t = time.monotonic()
            running = [start(spec) for spec in specs]
            for procs in running:
                finish(procs)
            at_once = time.monotonic() - t
            for spec in specs:
                check(spec.parent, shared)
        finally:
            for b in pair:
                b.stop()
    print(f"{args.jobs} jobs of {args.rows:,} x {args.rows:,} rows ({args.protocol}), checked")
    print(f"  in a row: {in_a_row:7.1f} s wall")
    print(f"  at once:  {at_once:7.1f} s wall ({at_once / in_a_row:.2f} x in a row)")


if __name__ == "__main__":
    main()
