"""A private PostgreSQL server for the tests, the demo and the benchmark.

``PgServer.start()`` finds ``initdb``/``pg_ctl`` (installing the Debian package with apt-get
when they are missing and we are root), creates a cluster in a fresh temporary folder, owned by
the ``postgres`` user when we are root (PostgreSQL refuses to run as root), listening only on a
unix socket in that folder, with password (SCRAM) authentication for a user ``psi``. ``stop()``
stops it and removes the folder. Nothing listens on TCP, so parallel servers never collide.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

USER = "psi"
DATABASE = "psi"
PORT = 5432  # only names the socket file (.s.PGSQL.5432) in the private folder


class PgUnavailable(RuntimeError):
    """No PostgreSQL server binaries and no way to install them."""


def _binaries() -> Path | None:
    for name in ("initdb", "pg_ctl"):
        if shutil.which(name) is None:
            break
    else:
        return Path(shutil.which("pg_ctl")).parent  # type: ignore[arg-type]
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(found[-1]).parent if found else None


def ensure_installed() -> Path:
    """The folder of initdb and pg_ctl; installs the Debian package if needed."""
    found = _binaries()
    if found is not None:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PgUnavailable("PostgreSQL is not installed and apt-get cannot be used here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "postgresql"]):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise PgUnavailable(f"{' '.join(cmd)} failed: {r.stderr.strip()[-300:]}")
    found = _binaries()
    if found is None:
        raise PgUnavailable("apt-get installed postgresql but no pg_ctl was found")
    return found


class PgServer:
    """One private cluster; ``url`` and ``password`` reach it as the ``psi`` user."""

    def __init__(self) -> None:
        self.folder: Path | None = None
        self.password = secrets.token_hex(16)
        self._bin: Path | None = None
        self._run_as: list[str] = []

    @property
    def socket_dir(self) -> Path:
        assert self.folder is not None
        return self.folder / "sock"

    @property
    def url(self) -> str:
        """A libpq URL without the password."""
        return f"postgresql://{USER}@/{DATABASE}?host={self.socket_dir}&port={PORT}"

    def start(self) -> PgServer:
        self._bin = ensure_installed()
        self.folder = Path(tempfile.mkdtemp(prefix="psi-pg-"))
        os.chmod(self.folder, 0o700)
        (self.socket_dir).mkdir()
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for p in (self.folder, self.socket_dir):
                os.chown(p, owner.pw_uid, owner.pw_gid)
            self._run_as = ["runuser", "-u", "postgres", "--"]
        pwfile = self.folder / "pw"
        pwfile.write_text(self.password)
        if self._run_as:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        self._run(["initdb", "-D", str(self.folder / "data"), "-U", USER, "--auth=scram-sha-256",
                   f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8"])  # fmt: skip
        pwfile.unlink()
        opts = f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}' -p {PORT}"
        opts += " -c fsync=off -c full_page_writes=off -c shared_buffers=32MB"
        self._run(["pg_ctl", "-D", str(self.folder / "data"), "-o", opts, "-w", "-t", "60",
                   "-l", str(self.folder / "server.log"), "start"])  # fmt: skip
        self.sql(f"CREATE DATABASE {DATABASE}", database="postgres")
        return self

    def _run(self, cmd: list[str]) -> None:
        assert self._bin is not None
        full = [*self._run_as, str(self._bin / cmd[0]), *cmd[1:]]
        r = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise PgUnavailable(f"{cmd[0]} failed: {(r.stderr or r.stdout).strip()[-400:]}")

    def connect(self, database: str = DATABASE):
        import psycopg

        return psycopg.connect(
            host=str(self.socket_dir), port=PORT, user=USER, password=self.password,
            dbname=database, autocommit=True,
        )  # fmt: skip

    def sql(self, statement: str, database: str = DATABASE) -> None:
        with self.connect(database) as conn:
            conn.execute(statement)

    def stop(self) -> None:
        """Stop the server (fast shutdown, bounded) and remove its folder (idempotent)."""
        if self.folder is None:
            return
        try:
            self._run(["pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "-w", "-t", "30",
                       "stop"])  # fmt: skip
        except PgUnavailable:
            pass
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder = None
