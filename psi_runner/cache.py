"""The unbalanced PSI caches on disk: one folder per party, private, with a manifest.

Each party's ``unbalanced.cache`` folder (0700; every file in it 0600) holds::

    manifest.json   what the cache is (below); written last, so a folder without one is not
                    a finished cache
    spu/            SPU's own cache folder (SPU removes and refills it: psi-run owns it)

The **server's** cache (built by ``psi-run SPEC --party SERVER --offline``) holds SPU's
evaluation of the server's keys under the server's secret OPRF key, the key itself (in SPU's
``ub_psi_cache.meta``, in the clear: the reason for 0600), and a sorted copy of the key file
psi-run gave SPU (canonical keys and row numbers). Its manifest: ``id`` (new at every
build), the SPU and psi-run versions, the spec fields it depends on (``unbalanced.fields``:
protocol, key columns, normalisation, prehashed columns), ``curve`` (FourQ, fixed by SPU),
``keys_digest`` (BLAKE2b of the keys given to SPU, in order: the staleness check), ``rows``,
``created`` and the size of every file.

A **client's** folder holds its copy of the server's evaluated keys (SPU's ``server_cache``,
about 36 bytes a server row; no key, no input), received in its first online job with that
version of the server's cache; its manifest names the server and the ``id`` of the cache the
copy is of.

A cache is built in a sibling folder and swapped in whole: a failed build leaves the previous
cache as it was.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from . import __version__
from .errors import PreflightError, cut

log = logging.getLogger("psi_runner.cache")

MANIFEST = "manifest.json"
SPU_FOLDER = "spu"
FORMAT = 1
CURVE = "CURVE_FOURQ"  # SPU 0.9.3b0's unbalanced PSI takes no curve: FourQ, 2-hash ECDH-OPRF


def spu_version() -> str:
    try:
        return metadata.version("spu")
    except metadata.PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Found:
    """What a cache folder holds: its manifest (None: nothing usable) and, if it cannot be
    used as it is, a problem code and a local detail."""

    manifest: dict | None
    problem: str = ""
    detail: str = ""


def read(folder: Path, role: str) -> Found:
    """The cache at ``folder`` as ``role`` ("server" or "client") expects it."""
    if not folder.exists():
        return Found(None, "missing", f"{_short(folder)} does not exist")
    if not folder.is_dir():
        return Found(None, "foreign", f"{_short(folder)} is not a folder")
    try:
        doc = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        if any(folder.iterdir()):
            return Found(None, "foreign", f"{_short(folder)} holds files but no {MANIFEST}")
        return Found(None, "missing", f"{_short(folder)} is empty")
    except (OSError, ValueError) as exc:
        return Found(None, "damaged", f"{MANIFEST} is unreadable ({exc})")
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return Found(None, "damaged", f"{MANIFEST} is not a psi-run cache manifest")
    if doc.get("role") != role:
        return Found(doc, "foreign", f"{_short(folder)} holds a {doc.get('role')} cache")
    for name, size in (doc.get("files") or {}).items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return Found(doc, "damaged", f"{name} is missing")
        if actual != size:
            return Found(doc, "damaged", f"{name} has {actual} bytes, the manifest says {size}")
    if doc.get("spu") != spu_version():
        return Found(doc, "version", f"built by spu {doc.get('spu')}, this is {spu_version()}")
    return Found(doc)


def check_server(folder: Path, fields: dict, keys_digest: str) -> Found:
    """The server's cache, checked against the spec's fields and the current input's keys."""
    found = read(folder, "server")
    doc = found.manifest
    if found.problem or doc is None:
        return found
    if doc.get("fields") != fields:
        built = doc.get("fields") or {}
        differ = [k for k in fields if built.get(k) != fields[k]]
        return Found(doc, "fields", f"{', '.join(differ) or 'fields'} differ from the spec's")
    if doc.get("keys_digest") != keys_digest:
        return Found(doc, "stale", f"built {doc.get('created')} from other keys")
    return found


@contextmanager
def private_umask() -> Iterator[None]:
    """Files SPU creates meanwhile are 0600 and folders 0700 (it makes them 0644 and 0755)."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


class Build:
    """A new cache for ``folder``, filled in a sibling folder and swapped in by ``install``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.staging = folder.parent / f".{folder.name}.new-{os.getpid()}"

    def __enter__(self) -> Build:
        try:
            self.folder.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(mode=0o700)
            os.chmod(self.staging, 0o700)
        except OSError as exc:
            raise PreflightError(
                f"cannot create a cache folder beside {_short(self.folder)} ({exc.strerror}); "
                "choose a writable unbalanced.cache folder"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)  # gone already after install

    @property
    def spu_folder(self) -> Path:
        return self.staging / SPU_FOLDER

    def install(self, manifest: dict) -> dict:
        """Write the manifest (with the files' sizes) and swap the new cache in; the manifest."""
        files = {}
        for path in sorted(self.staging.rglob("*")):
            os.chmod(path, 0o700 if path.is_dir() else 0o600)
            if path.is_file():
                files[str(path.relative_to(self.staging))] = path.stat().st_size
        doc = {"format": FORMAT, **manifest, "spu": spu_version(), "psi_run": __version__,
               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "files": files}  # fmt: skip
        target = self.staging / MANIFEST
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, sort_keys=True)
        old = self.folder.parent / f".{self.folder.name}.old-{os.getpid()}"
        if self.folder.exists():
            os.replace(self.folder, old)
        os.replace(self.staging, self.folder)
        shutil.rmtree(old, ignore_errors=True)
        return doc


def check_replaceable(folder: Path, role: str) -> None:
    """Refuse to replace a folder that holds something else than a psi-run cache."""
    found = read(folder, role)
    if found.problem == "foreign" and found.manifest is None:
        raise PreflightError(
            f"{_short(folder)} holds files but no psi-run cache; psi-run replaces the whole "
            "unbalanced.cache folder: point it at an empty or new folder"
        )


def new_id() -> str:
    return secrets.token_hex(12)


def _short(path: Path) -> str:
    return cut(str(path), 80)
