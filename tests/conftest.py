"""Shared fixtures: real broker processes on port 0, job specs, and pandas expectations."""

from __future__ import annotations

import csv
import json
import random
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.localnet import LocalBroker, run_parties, start_pair
from psi_runner.broker_client import BrokerClient, ptp_headers

# Key values that have broken SPU's CSV handling or naive tooling: commas, quotes, spaces,
# non-ASCII, '~' (the canonical-encoding marker), hex-looking text, an empty-looking quote.
TRICKY = [
    "张三",
    'quote"inside',
    "comma,inside",
    " lead space",
    "trail space ",
    "~tilde",
    "7e",
    "~7e",
    "multi\nline",
    "semi;colon",
    "'single'",
    "emoji 🙂",
    "a-b",
    "-",
]


@pytest.fixture
def brokers(tmp_path: Path, request):
    """Two routed brokers (alice, bob); ``request.param`` may name the route protocol."""
    protocol = getattr(request, "param", "grpc")
    pair = start_pair(tmp_path / "brokers", protocol=protocol)
    yield pair
    for b in pair:
        b.stop()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """alice's and bob's brokers, shared by the tests of one module (each uses its own
    job_id)."""
    brokers = start_pair(tmp_path_factory.mktemp("brokers"))
    yield brokers
    for b in brokers:
        b.stop()


def make_ids(n: int, prefix: str, rng: random.Random) -> list[str]:
    """``n`` distinct ids (distinct within one call)."""
    return [f"{prefix}{k:09d}" for k in rng.sample(range(10**9), n)]


def write_csv(path: Path, columns: dict[str, list[str]], lineterminator: str = "\r\n") -> None:
    """Write with the csv module (quotes only where needed), as users' tools do.

    The csv module ends lines with CRLF; ``lineterminator="\n"`` writes a file that psi-run
    can hand to SPU as it is (no quotes, no CR: the "plain" fast path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(columns)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator=lineterminator)
        w.writerow(names)
        for row in zip(*columns.values()):
            w.writerow(row)


def write_spec(folder: Path, brokers: list[LocalBroker], **overrides) -> Path:
    parties = {}
    for b in brokers:
        parties[b.party] = {
            "broker": b.http,
            "input": f"data/{b.party}.csv",
            "output": f"out/{b.party}_psi.csv",
        }
    doc = {
        "job_id": "t-001",
        "protocol": "RR22",
        "keys": ["uid"],
        "receiver": brokers[0].party,
        "parties": parties,
        **overrides,
    }
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def read_result(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def log_says(report: dict, text: str) -> bool:
    return text in Path(report["log"]).read_text(encoding="utf-8", errors="replace")


def expected_rows(inp: Path, other: Path, keys: list[str]) -> pd.DataFrame:
    """Independent computation: this party's rows whose key tuple occurs in the other file."""
    mine = pd.read_csv(inp, dtype=str, keep_default_na=False)
    theirs = pd.read_csv(other, dtype=str, keep_default_na=False)[keys].drop_duplicates()
    return mine.merge(theirs, on=keys, how="inner")


def assert_same_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    cols = list(want.columns)
    g = got.sort_values(cols).reset_index(drop=True)
    w = want.sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(g, w)


# SPU 0.9.3b0's ECDH PSI sometimes stalls for good after "MaskPeer finished" on both sides,
# on a direct brpc link as well as through the brokers (1 run in 20 here, 150 x 170 rows). ECDH
# tests therefore use a short receive timeout and may run the job again after such a stall;
# every attempt is a complete, independent run and its result is still checked with pandas.
ECDH_LINK = {"recv_timeout_ms": 30_000}


def run_ok(spec: Path, parties: list[str], stall_retries: int = 0, **kw) -> list[dict]:
    kw.setdefault("timeout_s", 240)  # test jobs take seconds; a hang should fail fast
    results = run_parties(spec, parties, **kw)
    while stall_retries > 0 and any("receive timeout" in r.stderr for r in results):
        stall_retries -= 1
        results = run_parties(spec, parties, **kw)
    for p, r in zip(parties, results):
        assert r.returncode == 0, f"{p} failed ({r.returncode}): {r.stderr}"
        assert "Traceback" not in r.stderr
    return [json.loads(r.stdout) for r in results]


def wait_for(predicate, timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout_s`` passes (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _http(broker: LocalBroker, op: str, headers: dict, body: bytes = b"", query: str = ""):
    """One PTP call to ``broker``'s HTTP port (a non-200 answer raises HTTPError)."""
    return BrokerClient(broker.http).call(op, headers, body, query=query)


def _hdr(session, topic, source, target=""):
    return ptp_headers(session, topic, source, target)


def leftovers(folder: Path, party: str = "") -> list[Path]:
    """What a failed job (of ``party``, or any) left in its output folder, besides its private
    (0700) checkpoint folders, which are kept on purpose so that the next run can resume."""
    return [
        p
        for p in folder.iterdir()
        if party in p.name
        and not (p.name.endswith(".ckpt") and p.is_dir() and (p.stat().st_mode & 0o077) == 0)
    ]


def finishes(fn, seconds: float = 10.0):
    """``fn()``'s result (or its exception), failing the test if it takes over ``seconds``."""
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box.get("result")


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files in ``folder``), made here."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = folder / "server.crt", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file
