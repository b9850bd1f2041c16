"""The demo on Parquet and PostgreSQL sources (``./demo.sh --source parquet|postgres``).

The same generated data as the CSV demo, written as Parquet or loaded into a private
PostgreSQL, run through ``jobs/alice_bob_parquet.yaml`` or ``jobs/alice_bob_postgres.yaml``
with the same brokers, and checked against pandas on the generated CSV files.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from harness.demo import ROOT, generate
from harness.localnet import LocalBroker, run_parties
from harness.pg import PgServer, PgUnavailable

DATA = ROOT / "demo" / "data"
PG_ENV = "PSI_PG_PASSWORD"


def run(source: str, rows: int, overlap: int) -> int:
    """Run the demo on ``source``; 0 when both results match pandas."""
    generate(DATA, rows, overlap)
    frames = {p: pd.read_csv(DATA / f"{p}.csv", dtype=str, keep_default_na=False)
              for p in ("alice", "bob")}  # fmt: skip
    expected = set(frames["alice"]["uid"]) & set(frames["bob"]["uid"])
    server = None
    env: dict[str, str] = {}
    try:
        if source == "parquet":
            spec = ROOT / "jobs" / "alice_bob_parquet.yaml"
            _write_parquet(frames)
        else:
            try:
                server = PgServer().start()
            except PgUnavailable as exc:
                print(f"demo: no PostgreSQL: {exc}")
                return 1
            spec = _postgres_spec(server, frames)
            env = {PG_ENV: server.password}
        got = _run(spec, env)
        if got is None:
            return 1
        ok = True
        for party in ("alice", "bob"):
            keys = _result_keys(source, party, server)
            status = "matches" if keys == expected else "DOES NOT MATCH"
            print(f"demo: {party}'s result: {len(keys)} rows, {status} the pandas intersection "
                  f"({len(expected)} ids)")  # fmt: skip
            ok = ok and keys == expected
        return 0 if ok else 1
    finally:
        if server is not None:
            server.stop()
            (ROOT / "demo" / "secrets" / "pg.pw").unlink(missing_ok=True)


def _write_parquet(frames: dict[str, pd.DataFrame]) -> None:
    alice = frames["alice"].assign(age=frames["alice"]["age"].astype("int32"))
    folder = DATA / "alice_parquet"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*.parquet"):
        old.unlink()
    half = len(alice) // 2
    for i, part in enumerate((alice.iloc[:half], alice.iloc[half:])):
        pq.write_table(pa.Table.from_pandas(part, preserve_index=False),
                       folder / f"part-{i}.parquet")  # fmt: skip
    bob = frames["bob"].assign(score=frames["bob"]["score"].astype("float64"))
    pq.write_table(pa.Table.from_pandas(bob, preserve_index=False), DATA / "bob.parquet")
    for party in ("alice", "bob"):
        (ROOT / "demo" / "out" / f"{party}_psi.parquet").unlink(missing_ok=True)


def _postgres_spec(server: PgServer, frames: dict[str, pd.DataFrame]) -> Path:
    with server.connect() as conn, conn.cursor() as cur:
        cur.execute("DROP TABLE IF EXISTS alice_customers, bob_customers, alice_psi, bob_psi")
        cur.execute("CREATE TABLE alice_customers (uid text, age integer)")
        cur.execute("CREATE TABLE bob_customers (uid text, segment text)")
        for table, frame in (("alice_customers", frames["alice"]), ("bob_customers",
                                                                    frames["bob"])):  # fmt: skip
            with cur.copy(f"COPY {table} FROM STDIN") as cp:
                for row in frame.itertuples(index=False):
                    cp.write_row(tuple(row))
    doc = yaml.safe_load((ROOT / "jobs" / "alice_bob_postgres.yaml").read_text("utf-8"))
    secrets = ROOT / "demo" / "secrets"
    secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
    pw = secrets / "pg.pw"
    pw.write_text(server.password + "\n")
    pw.chmod(0o600)
    for party in doc["parties"].values():
        for side in ("input", "output"):
            party[side]["postgres"] = server.url
        if "password_file" in party["input"]:
            party["input"]["password_file"] = party["output"]["password_file"] = str(pw)
        party["work_dir"] = str((ROOT / "jobs" / party["work_dir"]).resolve())
    spec = ROOT / "demo" / "work" / "alice_bob_postgres.yaml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return spec


def _run(spec: Path, env: dict[str, str]) -> list[dict] | None:
    logs = ROOT / "demo" / "logs"
    brokers = [LocalBroker(p, ROOT / "conf" / p, log_dir=logs / f"broker-{p}")
               for p in ("alice", "bob")]  # fmt: skip
    try:
        for b in brokers:
            try:
                b.start()
            except RuntimeError as exc:
                print(f"demo: {exc}")
                return None
        print(f"demo: running psi-run {spec} for alice and bob")
        t = time.monotonic()
        results = run_parties(spec, ["alice", "bob"], cwd=ROOT, log_dir=logs,
                              extra_env={**os.environ, **env})  # fmt: skip
        elapsed = time.monotonic() - t
    finally:
        for b in brokers:
            b.stop()
    reports = []
    for party, res in zip(("alice", "bob"), results):
        if res.returncode != 0:
            print(f"demo: {party} failed (exit {res.returncode}): {res.stderr.strip()}")
            return None
        reports.append(json.loads(res.stdout))
        print(f"demo: {party}: {json.dumps(reports[-1], ensure_ascii=False)}")
    print(f"demo: both parties finished in {elapsed:.1f} s")
    return reports


def _result_keys(source: str, party: str, server: PgServer | None) -> set[str]:
    if source == "parquet":
        table = pq.read_table(ROOT / "demo" / "out" / f"{party}_psi.parquet")
        columns = ", ".join(f"{f.name} {f.type}" for f in table.schema)
        print(f"demo: {party}'s Parquet result columns: {columns}")
        return set(table["uid"].to_pylist())
    assert server is not None
    with server.connect() as conn, conn.cursor() as cur:
        cur.execute(f"SELECT uid FROM {party}_psi")
        return {row[0] for row in cur.fetchall()}
