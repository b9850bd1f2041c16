"""Benchmark: reading a PostgreSQL table into Arrow batches, psycopg 3 versus ADBC.

Starts a private PostgreSQL (``harness/pg.py``), fills a table of N rows (``uid`` text, ``n``
bigint, ``payload`` text of 40 characters), then reads it whole, in batches, each way in a
fresh process (peak RSS is the process's own):

* ``psycopg-cursor``: psycopg 3, a named (server-side) cursor, ``fetchmany`` batches turned
  into Arrow arrays;
* ``psycopg-copy``: psycopg 3, ``COPY (query) TO STDOUT (FORMAT csv)`` streamed into
  pyarrow's CSV reader;
* ``adbc``: ``adbc_driver_postgresql`` (libpq, COPY binary), ``fetch_record_batch()``.

    .venv/bin/python bench/bench_pg_read.py --rows 2000000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from harness.pg import PgServer  # noqa: E402

READER = r"""
import json, resource, sys, time
how, url, password, rows = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
import pyarrow as pa
t = time.monotonic()
got = 0
if how == "adbc":
    import adbc_driver_postgresql.dbapi as dbapi
    uri = url.replace("psi@", "psi:" + password + "@")
    with dbapi.connect(uri) as conn, conn.cursor() as cur:
        cur.execute("SELECT uid, n, payload FROM t")
        for batch in cur.fetch_record_batch():
            got += batch.num_rows
else:
    import psycopg
    with psycopg.connect(url, password=password) as conn:
        if how == "psycopg-cursor":
            with conn.cursor(name="c") as cur:
                cur.itersize = 100_000
                cur.execute("SELECT uid, n, payload FROM t")
                while chunk := cur.fetchmany(100_000):
                    cols = list(zip(*chunk))
                    batch = pa.record_batch([pa.array(c) for c in cols], ["uid", "n", "payload"])
                    got += batch.num_rows
        else:
            import io, pyarrow.csv as pcsv
            buf = io.BytesIO()
            sql = "COPY (SELECT uid, n, payload FROM t) TO STDOUT (FORMAT csv, HEADER)"
            with conn.cursor().copy(sql) as cp:
                for data in cp:
                    buf.write(data)
            buf.seek(0)
            types = {"uid": pa.string(), "n": pa.int64(), "payload": pa.string()}
            options = pcsv.ConvertOptions(column_types=types)
            reader = pcsv.open_csv(buf, convert_options=options)
            for batch in reader:
                got += batch.num_rows
assert got == rows, (got, rows)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
print(json.dumps({"how": how, "s": round(time.monotonic() - t, 2), "peak_rss_mb": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    server = PgServer().start()
    try:
        server.sql(
            "CREATE TABLE t AS SELECT 'id' || lpad(g::text, 10, '0') AS uid, g::bigint AS n, "
            f"repeat('x', 40) AS payload FROM generate_series(1, {args.rows}) g"
        )
        for r in range(args.rounds):
            for how in ("psycopg-cursor", "psycopg-copy", "adbc"):
                out = subprocess.run(
                    [sys.executable, "-c", READER, how, server.url, server.password,
                     str(args.rows)],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                print(f"round {r + 1}: {json.loads(out.stdout)}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
