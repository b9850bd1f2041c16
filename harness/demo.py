"""The README's demo: two brokers and two parties on this machine, on generated data.

Starts ``psi-broker`` with ``conf/alice`` and ``conf/bob``, generates ``demo/data/*.csv``, runs
``psi-run jobs/alice_bob.yaml`` for both parties at once, checks the result against pandas
and prints it. Exit code 0 only when both parties succeeded and the result is right.

With ``--spec jobs/alice_bob_ray.yaml`` (``backend: ray``) it also starts one Ray head per
party at the spec's ``ray_address`` (disjoint port ranges derived from it) and stops them at
the end; a head that already answers there is used as it is.

``--source parquet`` runs ``jobs/alice_bob_parquet.yaml`` on the same data written as Parquet
(a folder of two files for alice, one file for bob). ``--source postgres`` starts a private
PostgreSQL (``harness/pg.py``), loads the data into tables and runs
``jobs/alice_bob_postgres.yaml`` against it (its socket folder filled in, written to
``demo/work/``); alice's password comes from an environment variable, bob's from a 0600 file.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import pandas as pd

from harness.localnet import LocalBroker, LocalRayHead, run_parties
from psi_runner.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def generate(folder: Path, rows: int, overlap: int, seed: int = 7) -> None:
    """Two CSV files sharing ``overlap`` ids; a few ids carry commas, quotes and non-ASCII."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"u{n:08d}" for n in rng.sample(range(10**8), 2 * rows - overlap)]
    ids[:3] = ["张三-001", 'o"neil,7', "  spaced id "]  # shared: in both files
    common, only_a, only_b = ids[:overlap], ids[overlap:rows], ids[rows:]
    a = common + only_a
    b = common + only_b
    rng.shuffle(a)
    rng.shuffle(b)
    pd.DataFrame({"uid": a, "age": [rng.randint(18, 90) for _ in a]}).to_csv(
        folder / "alice.csv", index=False
    )
    pd.DataFrame({"uid": b, "score": [round(rng.random(), 4) for _ in b]}).to_csv(
        folder / "bob.csv", index=False
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="psi-run demo: two local parties")
    parser.add_argument("--spec", default=str(ROOT / "jobs" / "alice_bob.yaml"))
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--overlap", type=int, default=5_000)
    parser.add_argument("--source", choices=("csv", "parquet", "postgres"), default="csv")
    args = parser.parse_args(argv)
    if args.source != "csv":
        from harness import demo_sources

        return demo_sources.run(args.source, args.rows, args.overlap)

    spec = load_spec(args.spec)
    parties = spec.party_names
    inputs = {p: spec.parties[p].input for p in parties}
    generate(inputs[parties[0]].parent, args.rows, args.overlap)
    for p in parties:
        spec.parties[p].output.unlink(missing_ok=True)

    logs = ROOT / "demo" / "logs"
    brokers = [LocalBroker(p, ROOT / "conf" / p, log_dir=logs / f"broker-{p}") for p in parties]
    heads: list[LocalRayHead] = []
    print(f"demo: starting brokers from {', '.join(str(b.conf_dir) for b in brokers)}")
    try:
        if spec.backend == "ray":
            for p in parties:
                address = spec.parties[p].ray_address
                if _answers(address):
                    print(f"demo:   {p}: using the Ray head already at {address}")
                    continue
                head = LocalRayHead(p, Path(f"/tmp/ray-demo-{p}"), address=address)
                print(f"demo:   {p}: starting a Ray head at {address}")
                try:
                    head.start()
                except RuntimeError as exc:
                    print(f"demo: {exc}")
                    return 1
                heads.append(head)
        for b in brokers:
            try:
                b.start()
            except RuntimeError as exc:
                print(f"demo: {exc}")
                return 1  # committed conf folder, fixed ports, as in production
            print(f"demo:   {b.party}: {json.dumps(b.addresses)}")
        print(
            f"demo: running psi-run {args.spec} for {' and '.join(parties)} "
            f"({args.rows} rows each, {args.overlap} shared)"
        )
        t = time.monotonic()
        results = run_parties(Path(args.spec), parties, cwd=ROOT, log_dir=logs)
        elapsed = time.monotonic() - t
    finally:
        for b in brokers:
            b.stop()
        for head in heads:
            head.stop()

    ok = True
    for p, res in zip(parties, results):
        if res.returncode != 0:
            ok = False
            print(f"demo: {p} failed (exit {res.returncode}): {res.stderr.strip()}")
        else:
            report = json.loads(res.stdout)
            print(f"demo: {p}: {json.dumps(report, ensure_ascii=False)}")
    if not ok:
        return 1

    expected = _expected(spec)
    print(f"demo: both parties finished in {elapsed:.1f} s")
    for p in parties:
        out = spec.parties[p].output
        got = set(pd.read_csv(out, dtype=str, keep_default_na=False)[spec.keys[0]])
        status = "matches" if got == expected else "DOES NOT MATCH"
        print(
            f"demo: {p}'s result {out}: {len(got)} rows, {status} the pandas intersection "
            f"({len(expected)} ids)"
        )
        ok = ok and got == expected
    print(
        pd.read_csv(spec.parties[spec.receiver].output, dtype=str, keep_default_na=False)
        .head(5)
        .to_string(index=False)
    )
    return 0 if ok else 1


def _answers(address: str) -> bool:
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _expected(spec) -> set[str]:
    key = spec.keys[0]
    frames = [
        pd.read_csv(spec.parties[p].input, dtype=str, keep_default_na=False)
        for p in spec.party_names
    ]
    return set(frames[0][key]) & set(frames[1][key])


if __name__ == "__main__":
    sys.exit(main())
