"""PostgreSQL inputs and outputs, through the Arrow-native ADBC driver (libpq, COPY binary).

A party's ``input`` or ``output`` may be a mapping instead of a path::

    input:
      postgres: postgresql://psi_reader@db.internal:5432/crm   # no password in the URL
      table: public.customers          # or  query: SELECT uid, name FROM customers WHERE ...
      password_env: PSI_PG_PASSWORD    # or  password_file: secrets/pg.pw  (mode 0600)

The password is read when the run connects, from the environment variable or the 0600 file the
spec names, and is never part of the spec's values, the digest, the log or the report (an error
text that quotes it is cleaned). Neither key: libpq's own means (``~/.pgpass``, peer auth).

Input: the table or query runs in a ``READ ONLY`` transaction (a query is wrapped as a
subquery, so it is one ``SELECT``), streamed in Arrow batches; each batch's key columns are
checked (NULL keys refused, naming the row) and kept as text, and the whole batch is spooled
to a Parquet file in the run's private work folder, from which the result rows are taken, so
memory holds the keys plus one batch and the result comes from the same snapshot the keys did.

Output: the result is written into a new table beside the target, and in the same transaction
the old table (if any) is dropped and the new one renamed into its place: readers see the old
table or the whole new one, and a failure leaves the old table as it was.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .dbspec import DbConfig
from .errors import OutputError, PreflightError, PsiRunError, cut, shown

log = logging.getLogger("psi_runner.database")


def _ident(name: str) -> str:
    return ".".join(f'"{part}"' for part in name.split("."))


def password(cfg: DbConfig, where: str) -> str | None:
    """The password the spec points at (None: libpq finds its own); PreflightError if the
    variable is unset or the file is missing or readable by others."""
    if cfg.password_env:
        value = os.environ.get(cfg.password_env)
        if value is None:
            raise PreflightError(
                f"{where}: environment variable {cfg.password_env} (password_env) is not set"
            )
        return value
    if cfg.password_file:
        shown_path = cut(str(cfg.password_file), 100)
        try:
            st = os.stat(cfg.password_file)
        except OSError as exc:
            raise PreflightError(f"{where}: password_file {shown_path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise PreflightError(f"{where}: password_file {shown_path} is not a regular file")
        if st.st_mode & 0o077:
            raise PreflightError(
                f"{where}: password_file {shown_path} can be read by others (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
            )
        text = cfg.password_file.read_text(encoding="utf-8")
        return text[:-1] if text.endswith("\n") else text
    return None


class _Connection:
    """An ADBC connection whose errors never show the password."""

    def __init__(self, cfg: DbConfig, where: str, error: type[PsiRunError] = PreflightError):
        self.where = where
        self.error = error
        self._secret = password(cfg, where)
        uri = cfg.url
        if self._secret is not None:
            uri += ("&" if "?" in uri else "?") + "password=" + quote(self._secret, safe="")
        try:
            import adbc_driver_postgresql.dbapi as dbapi

            self.conn = dbapi.connect(uri)
        except Exception as exc:  # noqa: BLE001 - every driver error becomes ours
            raise self.fail("cannot connect", exc) from None

    def fail(self, what: str, exc: BaseException) -> PsiRunError:
        text = str(exc).split("\n")[0]
        if self._secret:
            text = text.replace(self._secret, "***").replace(quote(self._secret, safe=""), "***")
        log.info("%s: %s: %s", self.where, what, text)
        return self.error(f"{self.where}: {what} ({shown(text, 120)[1:-1]})")

    def close(self) -> None:
        try:
            self.conn.close()
        except Exception as exc:  # noqa: BLE001 - closing after a failure
            log.debug("closing the connection: %s", type(exc).__name__)


@dataclass
class Spooled:
    """What reading a database input gave: its columns, its keys as text, the spool file."""

    columns: list[str]
    keys: pa.Table
    spool: Path


def read_input(cfg: DbConfig, keys: tuple[str, ...], spool: Path, where: str) -> Spooled:
    """Stream the table or query into ``spool`` (Parquet), checking its key columns."""
    db = _Connection(cfg, where)
    sql = f"SELECT * FROM {_ident(cfg.table)}" if cfg.table else f"SELECT * FROM ({cfg.query}) q"
    writer: pq.ParquetWriter | None = None
    parts: list[pa.Table] = []
    rows = 0
    try:
        cur = db.conn.cursor()
        try:
            cur.execute("SET TRANSACTION READ ONLY")
            cur.execute(sql)
            reader = cur.fetch_record_batch()
        except Exception as exc:  # noqa: BLE001
            raise db.fail("cannot read", exc) from None
        _check_key_columns(reader.schema, keys, where)
        writer = pq.ParquetWriter(spool, reader.schema)
        try:
            for batch in reader:
                _check_nulls(batch, keys, rows, where)
                # A copy: the driver's batch shares one allocation between its columns, so a
                # slice kept from it would keep the whole batch in memory.
                parts.append(
                    pa.table({k: _copy(pc.cast(batch.column(k), pa.string())) for k in keys})
                )
                writer.write_batch(batch, row_group_size=1 << 20)
                rows += batch.num_rows
        except PsiRunError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise db.fail("reading stopped", exc) from None
        columns = reader.schema.names
    finally:
        if writer is not None:
            writer.close()
        db.close()
    if rows == 0:
        raise PreflightError(f"{where}: has no rows")
    return Spooled(columns, pa.concat_tables(parts), spool)


def _copy(array: pa.Array) -> pa.Array:
    return pa.concat_arrays([array, pa.array([], array.type)])


def _check_key_columns(schema: pa.Schema, keys: tuple[str, ...], where: str) -> None:
    for k in keys:
        if k not in schema.names:
            listed = ", ".join(cut(n, 20) for n in schema.names[:6])
            raise PreflightError(
                f"{where}: key column {shown(k, 30)} not found; the columns are: {listed}"
            )
        kind = schema.field(k).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
                or pa.types.is_integer(kind)):  # fmt: skip
            raise PreflightError(
                f"{where}: key column {shown(k, 30)} has type {kind}; a key must be text or a "
                "whole number (cast it in a query, e.g. SELECT id::text AS id ...)"
            )


def _check_nulls(batch: pa.RecordBatch, keys: tuple[str, ...], start: int, where: str) -> None:
    for k in keys:
        column = batch.column(k)
        if column.null_count:
            first = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
            raise PreflightError(
                f"{where}: key column {shown(k, 30)} has NULL values (first: row "
                f"{start + first + 1}); filter them out (WHERE {k} IS NOT NULL in a query)"
            )


def check_output(cfg: DbConfig, where: str) -> None:
    """Connect and make sure the result table can be created in its schema."""
    assert cfg.table is not None
    db = _Connection(cfg, where)
    schema = cfg.table.split(".")[0] if "." in cfg.table else None
    try:
        cur = db.conn.cursor()
        if schema:
            cur.execute("SELECT has_schema_privilege($1, 'CREATE')", parameters=(schema,))
        else:
            cur.execute("SELECT has_schema_privilege(current_schema(), 'CREATE')")
        row = cur.fetchone()
        cur.close()
    except Exception as exc:  # noqa: BLE001
        raise db.fail("cannot check the output schema", exc) from None
    finally:
        db.close()
    if not row or not row[0]:
        raise PreflightError(
            f"{where}: this user may not create tables in schema {schema or '(default)'}; "
            "grant CREATE on it or choose another schema"
        )


def write_output(cfg: DbConfig, table: pa.Table, where: str) -> None:
    """Write ``table`` as ``cfg.table``: a new table, swapped in within one transaction."""
    assert cfg.table is not None
    db = _Connection(cfg, where, error=OutputError)
    schema, _, name = cfg.table.rpartition(".")
    temp = f"{name[:40]}__psi_new_{secrets.token_hex(4)}"
    try:
        cur = db.conn.cursor()
        cur.adbc_ingest(temp, table, mode="create", db_schema_name=schema or None)
        cur.execute(f"DROP TABLE IF EXISTS {_ident(cfg.table)}")
        qualified_temp = _ident(f"{schema}.{temp}" if schema else temp)
        cur.execute(f'ALTER TABLE {qualified_temp} RENAME TO "{name}"')
        db.conn.commit()
        cur.close()
    except Exception as exc:  # noqa: BLE001 - the transaction is rolled back: nothing changed
        try:
            db.conn.rollback()
        except Exception as undo:  # noqa: BLE001 - the server rolls back on disconnect
            log.debug("rollback: %s", type(undo).__name__)
        raise db.fail("cannot write the result table; the old one is unchanged", exc) from None
    finally:
        db.close()
