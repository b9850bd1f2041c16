"""PostgreSQL inputs and outputs against a real, private PostgreSQL server and pandas.

The module starts its own cluster (``harness/pg.py``: installed with apt-get if missing, a
unix socket in a temporary folder, stopped at the end) and skips with the reason when that is
impossible. Results are read back through psycopg, a different driver from the runner's.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import yaml
from conftest import TRICKY, make_ids, read_result, run_ok, write_csv

from harness.localnet import run_parties
from harness.pg import PgServer, PgUnavailable
from psi_runner import database
from psi_runner.data import inspect_database
from psi_runner.dbspec import DbConfig
from psi_runner.errors import OutputError, PreflightError, SpecError
from psi_runner.spec import load_spec

ENV = "PSI_TEST_PG_PASSWORD"


@pytest.fixture(scope="module")
def pg():
    try:
        server = PgServer().start()
    except PgUnavailable as exc:
        pytest.skip(f"no PostgreSQL server: {exc}")
    yield server
    server.stop()


def _frame(pg: PgServer, sql: str) -> pd.DataFrame:
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute(sql)
        names = [d.name for d in cur.description]
        return pd.DataFrame(cur.fetchall(), columns=names)


def _load(pg: PgServer, table: str, uids: list[str], seed: int) -> None:
    rng = random.Random(seed)
    with pg.connect() as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
        cur.execute(
            f"CREATE TABLE {table} (uid text, n integer, amount double precision, "
            "seen timestamp, note text, keep boolean)"
        )
        with cur.copy(f"COPY {table} FROM STDIN") as cp:
            for i, u in enumerate(uids):
                cp.write_row(
                    (
                        u,
                        i,
                        rng.random() * 1000,
                        f"2024-01-{1 + i % 28:02d} 12:00:00",
                        None if i % 5 == 0 else f"note {i}",
                        i % 10 != 3,
                    )
                )


def _column_types(pg: PgServer, table: str) -> dict[str, str]:
    got = _frame(
        pg,
        "SELECT column_name, data_type FROM information_schema.columns "
        f"WHERE table_name = '{table}' ORDER BY ordinal_position",
    )
    return dict(zip(got["column_name"], got["data_type"]))


def _spec(folder: Path, pair, job_id: str, alice: dict, bob: dict) -> Path:
    doc = {
        "job_id": job_id,
        "protocol": "RR22",
        "keys": ["uid"],
        "receiver": "alice",
        "timeout_s": 120,
        "parties": {
            "alice": {"broker": pair[0].http, **alice},
            "bob": {"broker": pair[1].http, **bob},
        },
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _pw_file(folder: Path, pg: PgServer) -> Path:
    path = folder / "secrets/pg.pw"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pg.password + "\n")
    path.chmod(0o600)
    return path


def test_table_and_query_in_table_out_match_pandas_and_the_password_stays_out(tmp_path, pair, pg):
    rng = random.Random(31)
    shared = [*make_ids(250, "s", rng), *TRICKY, ""]
    a = shared + make_ids(150, "a", rng)
    b = make_ids(120, "b", rng) + shared
    rng.shuffle(a)
    rng.shuffle(b)
    _load(pg, "alice_src", a, 1)
    _load(pg, "bob_src", b, 2)
    pg.sql("CREATE TABLE alice_out AS SELECT 'old result' AS stale")  # replaced on success
    url = pg.url
    spec = _spec(
        tmp_path,
        pair,
        "pg-1",
        alice={
            "input": {"postgres": url, "table": "public.alice_src", "password_env": ENV},
            "output": {"postgres": url, "table": "alice_out", "password_env": ENV},
        },
        bob={
            "input": {
                "postgres": url,
                "password_file": "secrets/pg.pw",
                "query": "SELECT uid, n, note FROM bob_src WHERE keep",
            },
            "output": "out/bob_psi.csv",
        },
    )
    _pw_file(tmp_path, pg)
    reports = run_ok(spec, ["alice", "bob"], extra_env={ENV: pg.password})
    bob_kept = {u for i, u in enumerate(b) if i % 10 != 3}
    alice_in = _frame(pg, "SELECT * FROM alice_src")
    want = alice_in[alice_in["uid"].isin(bob_kept)].sort_values("uid").reset_index(drop=True)
    got = _frame(pg, "SELECT * FROM alice_out").sort_values("uid").reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want)
    assert _column_types(pg, "alice_out") == _column_types(pg, "alice_src")
    bob_in = _frame(pg, "SELECT uid, n, note FROM bob_src WHERE keep")
    want_b = bob_in[bob_in["uid"].isin(set(a))].sort_values("uid").reset_index(drop=True)
    got_b = read_result(tmp_path / "out/bob_psi.csv").sort_values("uid").reset_index(drop=True)
    assert got_b["uid"].tolist() == want_b["uid"].tolist()
    assert got_b["n"].tolist() == [str(v) for v in want_b["n"]]
    assert got_b["note"].tolist() == ["" if v is None else v for v in want_b["note"]]
    assert [r["intersection_count"] for r in reports] == [len(want)] * 2
    by_party = {r["party"]: r for r in reports}
    assert by_party["alice"]["output"].startswith("postgres postgresql://psi@")
    for r in reports:
        assert pg.password not in json.dumps(r)
        assert pg.password not in Path(r["log"]).read_text(encoding="utf-8", errors="replace")
    leftover = _frame(pg, "SELECT tablename FROM pg_tables WHERE tablename LIKE '%psi_new%'")
    assert leftover.empty


def test_empty_intersection_replaces_the_table_with_an_empty_one_of_the_same_columns(
    tmp_path, pair, pg
):
    _load(pg, "alice_e", ["x1", "x2", "张三"], 3)
    write_csv(tmp_path / "data/bob.csv", {"uid": ["y1", "y2"]})
    pg.sql("CREATE TABLE alice_e_out AS SELECT 1 AS old")
    url = pg.url
    spec = _spec(
        tmp_path,
        pair,
        "pg-2",
        alice={
            "input": {"postgres": url, "table": "alice_e", "password_file": "secrets/pg.pw"},
            "output": {"postgres": url, "table": "alice_e_out", "password_file": "secrets/pg.pw"},
        },
        bob={"input": "data/bob.csv", "output": "out/bob_psi.csv"},
    )
    _pw_file(tmp_path, pg)
    reports = run_ok(spec, ["alice", "bob"])
    assert [r["intersection_count"] for r in reports] == [0, 0]
    assert _frame(pg, "SELECT count(*) AS c FROM alice_e_out")["c"][0] == 0
    assert _column_types(pg, "alice_e_out") == _column_types(pg, "alice_e")


def test_bad_database_inputs_are_refused_in_preflight_naming_the_source(tmp_path, pair, pg):
    pg.sql("DROP TABLE IF EXISTS nulls; CREATE TABLE nulls (uid text, v int)")
    pg.sql("INSERT INTO nulls VALUES ('a', 1), ('b', 2), (NULL, 3)")
    pg.sql("DROP TABLE IF EXISTS dups")
    pg.sql("CREATE TABLE dups AS SELECT 'k' AS uid FROM generate_series(1, 2)")
    pg.sql("DROP TABLE IF EXISTS victim; CREATE TABLE victim AS SELECT 1 AS x")
    pg.sql("DROP SEQUENCE IF EXISTS sq; CREATE SEQUENCE sq")
    pw = _pw_file(tmp_path, pg)
    cases = {
        "nulls": ({"table": "nulls"}, "key column 'uid' has NULL values (first: row 3)"),
        "dups": ({"table": "dups"}, "1 duplicate key row(s)"),
        "writes": ({"query": "SELECT 1 AS uid; DROP TABLE victim"}, "cannot read"),
        "typed": ({"query": "SELECT 1.5::float8 AS uid"}, "has type double"),
        "side effect": ({"query": "SELECT nextval('sq')::text AS uid"}, "read-only transaction"),
    }
    for name, (what, expected) in cases.items():
        cfg = DbConfig(pg.url, what.get("table"), what.get("query"), None, pw)
        with pytest.raises(PreflightError) as info:
            inspect_database(
                cfg, ("uid",), False, None, tmp_path / f"{name.replace(' ', '_')}.parquet"
            )
        assert expected in str(info.value), name
    assert _frame(pg, "SELECT count(*) AS c FROM victim")["c"][0] == 1  # read only
    assert not _frame(pg, "SELECT is_called FROM sq")["is_called"][0]  # nextval never ran
    pw.chmod(0o644)
    with pytest.raises(PreflightError, match=r"can be read by others \(mode 0644\); chmod 600"):
        database.password(DbConfig(pg.url, "t", None, None, pw), "input x")
    os.environ.pop(ENV, None)
    with pytest.raises(
        PreflightError, match=rf"environment variable {ENV} \(password_env\) is not set"
    ):
        database.password(DbConfig(pg.url, "t", None, ENV, None), "input x")
    wrong = tmp_path / "wrong.pw"
    wrong.write_text("not-the-password")
    wrong.chmod(0o600)
    with pytest.raises(PreflightError) as info:
        database.read_input(
            DbConfig(pg.url, "nulls", None, None, wrong),
            ("uid",),
            tmp_path / "w.parquet",
            "input x",
        )
    assert "cannot connect" in str(info.value) and "not-the-password" not in str(info.value)


def test_a_password_in_the_spec_is_refused(tmp_path, pair):
    spec = _spec(
        tmp_path,
        pair,
        "pg-3",
        alice={
            "input": {"postgres": "postgresql://u:hunter2@db/x", "table": "t"},
            "output": "out/a.csv",
        },
        bob={
            "input": {"postgres": "postgresql://u@db/x?password=hunter2", "query": "SELECT 1"},
            "output": {"postgres": "postgresql://u@db/x"},
        },
    )
    with pytest.raises(SpecError) as info:
        load_spec(spec)
    text = str(info.value)
    assert "hunter2" not in text
    assert "parties.alice.input.postgres: holds a password" in text
    assert "parties.bob.input.postgres: holds a password" in text
    assert "parties.bob.output.table: required" in text


def test_a_failed_table_write_leaves_the_old_table(tmp_path, pg):
    pg.sql("DROP TABLE IF EXISTS kept CASCADE; CREATE TABLE kept AS SELECT 'old' AS v")
    pg.sql("CREATE VIEW kept_view AS SELECT v FROM kept")  # the old table cannot be dropped
    pw = _pw_file(tmp_path, pg)
    cfg = DbConfig(pg.url, "kept", None, None, pw)
    with pytest.raises(OutputError, match="the old one is unchanged"):
        database.write_output(cfg, pa.table({"v": ["new", "newer"]}), "output x")
    assert _frame(pg, "SELECT v FROM kept")["v"].tolist() == ["old"]
    assert _frame(pg, "SELECT tablename FROM pg_tables WHERE tablename LIKE 'kept__psi%'").empty
    pg.sql("DROP VIEW kept_view")
    database.write_output(cfg, pa.table({"v": ["new", "newer"]}), "output x")
    assert sorted(_frame(pg, "SELECT v FROM kept")["v"]) == ["new", "newer"]


def test_a_peer_failure_after_preflight_leaves_the_old_table(tmp_path, pair, pg):
    _load(pg, "alice_f", ["a", "b", "c"], 4)
    pg.sql("DROP TABLE IF EXISTS alice_f_out; CREATE TABLE alice_f_out AS SELECT 'old' AS v")
    write_csv(tmp_path / "data/bob.csv", {"uid": ["a", "a"]})  # duplicates: bob's preflight fails
    spec = _spec(
        tmp_path,
        pair,
        "pg-4",
        alice={
            "input": {"postgres": pg.url, "table": "alice_f", "password_file": "secrets/pg.pw"},
            "output": {
                "postgres": pg.url,
                "table": "alice_f_out",
                "password_file": "secrets/pg.pw",
            },
        },
        bob={"input": "data/bob.csv", "output": "out/bob_psi.csv"},
    )
    _pw_file(tmp_path, pg)
    results = run_parties(spec, ["alice", "bob"], timeout_s=120)
    assert [r.returncode for r in results] == [4, 3], [r.stderr for r in results]
    assert _frame(pg, "SELECT v FROM alice_f_out")["v"].tolist() == ["old"]
    assert not list(tmp_path.glob(".psi-run-*"))  # nothing left in alice's work folder
