"""Checkpoints for resume: where SPU keeps its recovery files, and what they belong to.

A checkpointed run keeps SPU's recovery folder (``PsiConfig.recovery_config``) and every file
whose path SPU records in it (its input, output and trace paths must not change between
attempts) in one private (0700) folder per party and job, beside the output::

    .psi-run-<party>-<job_id>.ckpt/
        identity.json     job id, spec digest, digest of this party's input, the joint run
        spu/              SPU's recovery folder (its scratch files live there too)
        spu_input.csv     the canonical-key file, when the input needs one
        spu_output.csv    SPU's output
        spu.trace         SPU's trace

It is kept when a run fails and removed when the job succeeds. Whether to resume is agreed in
the handshake (both sides must hold a checkpoint of the same joint run, for the same spec, and
their inputs must be unchanged); this module only stores and identifies.

SPU 0.9.3b0 resumes RR22 and KKRT from the last finished bucket of 2^20 keys (reading, sorting
and bucketing the input is always redone). Its ECDH resume restarts its item counter and its
legacy ``psi_csv`` has no recovery at all: those jobs always start from the beginning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .digest import spec_digest
from .spec import JobSpec

_CHUNK = 1 << 20
NO_CHECKPOINT = "has no checkpoint"


def supported(spec: JobSpec) -> bool:
    """Whether SPU can resume this job's PSI (a sharded job is not checkpointed)."""
    return spec.api == "psi" and spec.protocol in ("RR22", "KKRT") and spec.shards == 1


def content_hash():
    """The hash of an input's bytes behind its checkpoint (BLAKE2b, 20 bytes). The preflight
    feeds a single CSV file's bytes to one as it checks them (``data.inspect_input``), so the
    file is not read a second time for its digest."""
    return hashlib.blake2b(digest_size=20)


def input_digest(path: Path) -> str:
    """A digest of the party's input file, or of a Parquet folder's files and their names
    (BLAKE2b; it reads each file once, in chunks)."""
    h = content_hash()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            h.update(file.name.encode("utf-8", "surrogateescape") + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def keys_digest(keys: pa.Table) -> str:
    """A digest of the keys given to SPU, in order (a database input has no file to digest;
    another order or other keys mean another input)."""
    h = hashlib.blake2b(digest_size=20)
    for name in keys.column_names:
        column = keys[name].combine_chunks().cast(pa.large_string())
        h.update(name.encode("utf-8") + b"\0")
        for buffer in column.buffers()[1:]:
            h.update(b"" if buffer is None else memoryview(buffer))
    return "keys-" + h.hexdigest()


@dataclass
class Checkpoint:
    """One party's checkpoint folder for one job."""

    folder: Path

    @classmethod
    def of(cls, spec: JobSpec, party: str) -> Checkpoint:
        folder = spec.parties[party].local_folder
        return cls(folder / f".psi-run-{party}-{spec.job_id}.ckpt")

    @property
    def spu_folder(self) -> Path:
        return self.folder / "spu"

    def identity(self) -> dict | None:
        """What the folder says it belongs to (None: no usable checkpoint)."""
        try:
            doc = json.loads((self.folder / "identity.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def matches(self, spec: JobSpec, digest_of_input: str) -> str:
        """Why this checkpoint cannot be resumed ("" when it can)."""
        found = self.identity()
        if found is None:
            return NO_CHECKPOINT
        if found.get("spec_digest") != spec_digest(spec):
            return "has a checkpoint of another version of the spec"
        if found.get("input_digest") != digest_of_input:
            return "has a different input than its checkpoint"
        return ""

    def start(self, spec: JobSpec, digest_of_input: str, run: str, key_code: str = "hex") -> None:
        """A new checkpoint for the joint run ``run`` (any older one is removed);
        ``key_code``: how SPU's input file writes non-plain keys (``keycode``)."""
        self.remove()
        self.folder.mkdir(mode=0o700)
        os.chmod(self.folder, 0o700)  # whatever the umask
        doc = {"job_id": spec.job_id, "spec_digest": spec_digest(spec),
               "input_digest": digest_of_input, "run": run, "key_code": key_code}  # fmt: skip
        (self.folder / "identity.json").write_text(json.dumps(doc), encoding="utf-8")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
