"""Benchmark: resume after both runners are killed, against a fresh run, in one invocation.

N x N rows (half shared), RR22 by default, through two local brokers:

  1. a fresh run (``--fresh``): wall time;
  2. a run whose two psi-run processes are SIGKILLed when the PSI passes ``--kill-at`` %;
  3. the rerun, which resumes from both checkpoints: wall time, and the result checked
     against the set of shared ids the data was built with.

    .venv/bin/python bench/bench_resume.py --rows 10000000 --kill-at 60
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from conftest import write_spec  # noqa: E402

from harness.localnet import psi_run_command, start_pair  # noqa: E402


def make_data(folder: Path, rows: int) -> set[str]:
    """Two inputs of ``rows`` ids sharing half of them; the shared ids."""
    rng = np.random.default_rng(1)
    pool = rng.choice(10**10, size=2 * rows - rows // 2, replace=False)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    for name, ids in (("alice", pool[:rows]), ("bob", pool[rows - rows // 2 :])):
        with open(folder / f"data/{name}.csv", "w") as fh:
            fh.write("uid\n" + "\n".join(f"id{v:010d}" for v in ids.tolist()) + "\n")
    return {f"id{v:010d}" for v in pool[rows - rows // 2 : rows].tolist()}


def run(spec: Path, kill_at: float | None = None, extra: tuple[str, ...] = ()) -> float:
    """Both parties at once; wall seconds (killed at ``kill_at`` % of the PSI, if given)."""
    started = time.monotonic()
    procs = {
        p: subprocess.Popen(
            psi_run_command(spec, p, None, "--progress", "json", *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in ("alice", "bob")
    }
    if kill_at is None:
        for party, proc in procs.items():
            _, err = proc.communicate()
            if proc.returncode != 0:
                raise SystemExit(f"{party} failed: {err[-500:]}")
        return time.monotonic() - started
    percent = [0.0]

    def watch() -> None:
        for line in procs["alice"].stderr:  # type: ignore[union-attr]
            if line.startswith("{"):
                percent[0] = float(json.loads(line).get("percent") or 0)

    threading.Thread(target=watch, daemon=True).start()
    while percent[0] < kill_at and procs["alice"].poll() is None:
        time.sleep(0.05)
    for proc in procs.values():
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_000_000)
    ap.add_argument("--kill-at", type=float, default=60.0, help="percent of the PSI")
    ap.add_argument("--protocol", default="RR22", choices=("RR22", "KKRT"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        folder = Path(tmp)
        shared = make_data(folder, args.rows)
        brokers = start_pair(folder / "brokers")
        try:
            spec = write_spec(folder, brokers, job_id="bench-resume", protocol=args.protocol)
            fresh = run(spec, extra=("--fresh",))
            killed = run(spec, kill_at=args.kill_at)
            saved = {}
            for party in ("alice", "bob"):
                ckpt = folder / f"out/.psi-run-{party}-bench-resume.ckpt/spu/checkpoint.json"
                saved[party] = json.loads(ckpt.read_text()).get("parsed_bucket_count", "0")
            resumed = run(spec)
        finally:
            for b in brokers:
                b.stop()
        with open(folder / "out/alice_psi.csv") as fh:
            got = fh.read().split("\n")[1:-1]
    right = len(got) == len(shared) and set(got) == shared
    print(f"{args.protocol} {args.rows} x {args.rows} rows: fresh {fresh:.1f} s; killed after "
          f"{killed:.1f} s at {args.kill_at:.0f} % (buckets done: {saved}); resumed "
          f"{resumed:.1f} s (x{resumed / fresh:.2f}); result "
          f"{'matches' if right else 'DOES NOT MATCH'} the {len(shared)} shared ids")  # fmt: skip
    return 0 if right else 1


if __name__ == "__main__":
    sys.exit(main())
