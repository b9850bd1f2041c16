"""Benchmark: unbalanced PSI (ECDH_OPRF_UB) against balanced RR22 and ECDH on the same data.

bob (the server, the large set: ``--server-rows``) and alice (the client: ``--client-rows``)
share ``--overlap`` keys. Through two ``psi-broker`` processes and ``psi-run``, in one run:

  1. ``ub offline``   bob's ``psi-run SPEC --party bob --offline`` (builds his cache; alone)
  2. ``ub online 1``  the first online job: bob sends alice her copy of the cache, then online
  3. ``ub online 2``  a second online job (another job id): the copy is reused, online only
  4. ``RR22``         a balanced RR22 job on the same two files
  5. ``ECDH``         a balanced ECDH job on the same two files (``--ecdh`` off skips it)

alice receives the result in every job. For each: the wall time from start to both parties'
exit, the report's stage seconds (preflight, transfer, PSI) and the intersection, checked
against ``--overlap``. See bench/README.md.

    .venv/bin/python bench/bench_ub.py --server-rows 10000000 --client-rows 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo's harness/
from harness.localnet import BIN, run_parties, start_pair

PARTIES = ("alice", "bob")


def write_ids(path: Path, ids: np.ndarray) -> None:
    keys = pa.array(np.char.add("u", np.char.zfill(ids.astype(str), 10)))
    pcsv.write_csv(pa.table({"uid": keys}), path, pcsv.WriteOptions(quoting_style="none"))


def make_data(folder: Path, server: int, client: int, overlap: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.choice(10**10, size=server + client - overlap, replace=False)
    bob = ids[:server]
    alice = np.concatenate([ids[:overlap], ids[server:]])
    rng.shuffle(alice)
    write_ids(folder / "bob.csv", bob)
    write_ids(folder / "alice.csv", alice)


def spec(folder: Path, brokers, job_id: str, protocol: str) -> Path:
    doc: dict = {
        "job_id": job_id,
        "protocol": protocol,
        "keys": ["uid"],
        "receiver": "alice",
        "broadcast_result": False,
        "timeout_s": 3600,
        "link": {"recv_timeout_ms": 1_800_000},
        "parties": {
            b.party: {
                "broker": b.http,
                "input": str(folder / f"{b.party}.csv"),
                "output": str(folder / f"out/{job_id}-{b.party}.csv"),
            }
            for b in brokers
        },
    }
    if protocol == "ECDH_OPRF_UB":
        doc["unbalanced"] = {
            "server": "bob",
            "cache": {p: str(folder / f"cache/{p}") for p in PARTIES},
        }
    path = folder / f"{job_id}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def run(name: str, path: Path, parties: list[str], extra: list[str], want: int) -> dict:
    t = time.monotonic()
    results = run_parties(path, parties, timeout_s=3600, extra_args=extra)
    wall = time.monotonic() - t
    reports = {}
    for party, r in zip(parties, results):
        if r.returncode != 0:
            raise SystemExit(f"{name}: {party} failed ({r.returncode}): {r.stderr[-600:]}")
        reports[party] = json.loads(r.stdout)
    got = reports.get("alice", {}).get("intersection_count")
    if "alice" in reports and got != want:
        raise SystemExit(f"{name}: alice's intersection is {got}, expected {want}")
    row = {"name": name, "wall_s": round(wall, 1)}
    for party, rep in reports.items():
        secs = rep.get("seconds", {})
        for key in ("preflight_s", "offline_s", "transfer_s", "psi_s", "total_s"):
            if key in secs:
                row[f"{party}.{key}"] = round(secs[key], 1)
        if "bytes" in rep:
            row[f"{party}.sent_MB"] = round(rep["bytes"]["sent"] / 1e6, 1)
    print(json.dumps(row), flush=True)
    return row


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--server-rows", type=int, default=10_000_000)
    ap.add_argument("--client-rows", type=int, default=100_000)
    ap.add_argument("--overlap", type=int, default=50_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--no-ecdh", action="store_true", help="skip the balanced ECDH job")
    ap.add_argument("--no-rr22", action="store_true", help="skip the balanced RR22 job")
    ap.add_argument("--dir", default=None, help="work folder (default: a private temp folder)")
    args = ap.parse_args(argv)
    folder = Path(tempfile.mkdtemp(prefix=".bench-ub-", dir=args.dir))
    os.chmod(folder, 0o700)
    print(f"# {' '.join(sys.argv)}", flush=True)
    print(f"# {platform.platform()}, {os.cpu_count()} cores, psi-run at {BIN}", flush=True)
    brokers = []
    try:
        t = time.monotonic()
        make_data(folder, args.server_rows, args.client_rows, args.overlap, args.seed)
        print(f"# data: bob {args.server_rows:,}, alice {args.client_rows:,}, overlap "
              f"{args.overlap:,} ({time.monotonic() - t:.1f} s)", flush=True)  # fmt: skip
        brokers = start_pair(folder / "brokers")
        (folder / "out").mkdir()
        want = args.overlap
        ub1 = spec(folder, brokers, "ub-online-1", "ECDH_OPRF_UB")
        run("ub offline (bob alone)", ub1, ["bob"], ["--offline"], want)
        print(f"# bob's cache: {_size(folder / 'cache/bob') / 1e6:,.0f} MB", flush=True)
        run("ub online 1 (with transfer)", ub1, list(PARTIES), [], want)
        print(f"# alice's copy: {_size(folder / 'cache/alice') / 1e6:,.0f} MB", flush=True)
        ub2 = spec(folder, brokers, "ub-online-2", "ECDH_OPRF_UB")
        run("ub online 2 (copy reused)", ub2, list(PARTIES), [], want)
        if not args.no_rr22:
            run("balanced RR22", spec(folder, brokers, "rr22", "RR22"), list(PARTIES), [], want)
        if not args.no_ecdh:
            run("balanced ECDH", spec(folder, brokers, "ecdh", "ECDH"), list(PARTIES), [], want)
    finally:
        for b in brokers:
            b.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
