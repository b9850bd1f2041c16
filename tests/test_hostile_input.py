"""Hostile inputs, outputs and broker addresses at preflight (issue 16): exit 3, one short line.

Paths are checked for what they are before anything is opened (a FIFO input used to block for
ever; /dev/null as output was accepted); an input's bytes are scanned in fixed-size chunks (a
1.7 GB file of zeros or random bytes used to be read whole, then fail with a MemoryError); a
broker address that is not a psi-broker's HTTP PTP port is named with what answered there (its
gRPC port used to surface as "internal error"). Then generated inputs (hypothesis): the
streaming scan agrees with a whole-file check at every chunk size, and ``inspect_input`` gives a
table or a short PreflightError, never anything else.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from conftest import finishes, self_signed_cert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.localnet import LocalBroker, psi_run_command
from psi_runner import data
from psi_runner.broker_client import check_broker
from psi_runner.data import (
    LINE_MAX_BYTES,
    check_input_path,
    check_output_location,
    inspect_input,
    scan_text,
)
from psi_runner.errors import LINE_MAX, PreflightError

PREFIX = "psi-run: "


def refusal(fn, *args) -> str:
    """The PreflightError message of ``fn(*args)``, checked to fit on one short line."""
    with pytest.raises(PreflightError) as info:
        fn(*args)
    text = str(info.value)
    assert "\n" not in text and len(PREFIX + text) <= LINE_MAX, text[:300]
    assert text.isprintable(), repr(text)
    return text


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.csv"
    os.mkfifo(path)
    yield path
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)  # lets a reader that did block go
    os.close(fd)


@pytest.fixture
def unix_socket(tmp_path):
    path = tmp_path / "sock.csv"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        yield path


# --- what the paths are ----------------------------------------------------------------------


def test_fifo_input_is_refused_without_blocking(fifo) -> None:
    for fn in (check_input_path, lambda p: inspect_input(p, ("uid",))):
        with pytest.raises(PreflightError) as info:
            finishes(lambda fn=fn: fn(fifo), 5)
        assert str(info.value) == (
            f"input {fifo}: is a named pipe (FIFO), not a regular file; save the data to a CSV "
            "file and point input at it"
        )


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_device_input_is_refused_unread(device) -> None:
    text = refusal(lambda: finishes(lambda: inspect_input(Path(device), ("uid",)), 5))
    assert "is a character device, not a regular file" in text


def test_socket_input_is_refused(unix_socket) -> None:
    assert "is a socket, not a regular file" in refusal(check_input_path, unix_socket)


def test_symlink_loop_input_is_refused(tmp_path) -> None:
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    assert "Too many levels of symbolic links" in refusal(check_input_path, tmp_path / "a")


@pytest.mark.parametrize("target", ["/dev/null", "/dev/zero"])
def test_device_output_is_refused(tmp_path, target) -> None:
    text = refusal(check_output_location, Path(target))
    assert text.startswith(f"output {target}: is a character device, not a regular file")
    link = tmp_path / "out.csv"
    link.symlink_to(target)  # a link to a device is what it points at
    assert "is a character device" in refusal(check_output_location, link)


def test_fifo_socket_and_folder_outputs_are_refused(fifo, unix_socket, tmp_path) -> None:
    assert "is a named pipe (FIFO), not a regular file" in refusal(check_output_location, fifo)
    assert "is a socket, not a regular file" in refusal(check_output_location, unix_socket)
    assert refusal(check_output_location, tmp_path).endswith("is a folder; name a file")


def test_absent_or_regular_output_is_accepted_and_its_folder_created(tmp_path) -> None:
    check_output_location(tmp_path / "new" / "deeper" / "out.csv")
    assert (tmp_path / "new" / "deeper").is_dir()
    (tmp_path / "old.csv").write_text("x\n")
    check_output_location(tmp_path / "old.csv")
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "nowhere.csv")
    check_output_location(tmp_path / "dangling.csv")  # the rename replaces the link


# --- what the input holds --------------------------------------------------------------------


def measured(fn) -> tuple[float, int]:
    """Seconds and peak traced bytes of ``fn()``, which must raise PreflightError."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(PreflightError):
            fn()
        return time.monotonic() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zeros_without_a_newline_are_refused_at_once_in_little_memory(tmp_path) -> None:
    path = tmp_path / "zeros.csv"
    with open(path, "wb") as fh:
        fh.truncate(1700 << 20)  # 1.7 GB of zeros, sparse: it costs no disk
    seconds, peak = measured(lambda: inspect_input(path, ("uid",)))
    assert seconds < 2 and peak < 20 << 20, (seconds, peak)
    assert refusal(inspect_input, path, ("uid",)) == (
        f"input {path}: not CSV text (a NUL byte at line 1, byte offset 0); is it a binary or "
        "UTF-16 file?"
    )


def test_random_bytes_are_refused_at_the_first_bad_byte_in_little_memory(tmp_path) -> None:
    path = tmp_path / "random.csv"
    path.write_bytes(b"uid\n" + bytes(range(0x80, 0x100)) + os.urandom(20 << 20))
    seconds, peak = measured(lambda: inspect_input(path, ("uid",)))
    assert seconds < 2 and peak < 20 << 20, (seconds, peak)
    text = refusal(inspect_input, path, ("uid",))
    assert text.startswith(f"input {path}: not UTF-8 text (byte 0x80 at line 2, byte offset 4)")


def test_a_line_longer_than_the_cap_is_refused_naming_where_it_starts(tmp_path) -> None:
    path = tmp_path / "long.csv"
    path.write_bytes(b"uid\nu1\n" + b"a" * (3 * LINE_MAX_BYTES) + b"\nu2\n")
    _, peak = measured(lambda: inspect_input(path, ("uid",)))
    assert peak < 20 << 20, peak
    assert refusal(inspect_input, path, ("uid",)) == (
        f"input {path}: line 3 (from byte offset 7) is longer than {LINE_MAX_BYTES} bytes, the "
        "most a row may have; is it a CSV text file?"
    )
    path.write_bytes(b"uid\n" + b"a" * LINE_MAX_BYTES + b"\n")  # exactly the cap is a row
    assert inspect_input(path, ("uid",)).rows == 1


def test_the_scan_of_a_large_valid_file_stays_in_a_few_mb(tmp_path) -> None:
    path = tmp_path / "big.csv"
    with open(path, "wb") as fh:
        fh.write(b"uid,name\n")
        row = "".join(f"u{i:07d},张三 {i}\n" for i in range(1000)).encode()
        for _ in range(2000):  # about 40 MB
            fh.write(row)
    fd = os.open(path, os.O_RDONLY)
    tracemalloc.start()
    try:
        scan_text(fd, "input big.csv")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        os.close(fd)
    assert peak < 10 << 20, peak


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"uid\na\x00b\n", "not CSV text (a NUL byte at line 2, byte offset 5)"),
        (b"uid\nab\xc3", "not UTF-8 text (byte 0xc3 at line 2, byte offset 6)"),
        (b"\xff\xfeu\x00i\x00d\x00", "not UTF-8 text (byte 0xff at line 1, byte offset 0)"),
        (b"uid\ra\rb\r", "its first line holds a CR alone"),
        (b"u" * 200_000 + b"\nx\n", "the header line is not CSV (field larger than"),
    ],
)
def test_input_that_is_not_csv_text_is_one_sentence(tmp_path, content, needle) -> None:
    path = tmp_path / "in.csv"
    path.write_bytes(content)
    assert needle in refusal(inspect_input, path, ("uid",))


def test_a_wide_header_is_checked_in_linear_time(tmp_path) -> None:
    path = tmp_path / "w.csv"
    names = [f"c{i}" for i in range(100_000)]  # a 600 KB header line
    path.write_text(",".join(names) + "\n" + ",".join("x" * len(names)) + "\n")
    started = time.monotonic()
    text = refusal(inspect_input, path, ("uid",))
    assert time.monotonic() - started < 10
    assert text.endswith("the columns are: c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10 ... "
                         "(100000 columns)")  # fmt: skip


# --- the broker address ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    """alice's broker with all four listeners: gRPC, gRPC TLS, HTTP and HTTPS."""
    folder = tmp_path_factory.mktemp("broker")
    crt, key = map(str, self_signed_cert(folder))
    tls = {
        "open.grpc.tls.server": "true",
        "grpc.tls.port": "0",
        "grpc.server.cert.chain.file": crt,
        "grpc.server.private.key.file": key,
        "open.https.server": "true",
        "https.port": "0",
        "https.server.cert.chain.file": crt,
        "https.server.private.key.file": key,
    }
    b = LocalBroker("alice", folder / "conf", tls)
    b.write_config({})
    b.start()
    yield b
    b.stop()


def _listener(answer: bytes | None) -> str:
    """A TCP service on port 0 that sends ``answer`` and closes, or (None) says nothing."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            if answer is None:
                threading.Timer(3, conn.close).start()
            else:
                conn.recv(4096)  # the request
                conn.sendall(answer)
                conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def test_the_http_port_is_the_broker(broker) -> None:
    assert check_broker(broker.http, "alice")["self_party"] == ["alice"]


@pytest.mark.parametrize(
    "listener, what",
    [
        ("grpc", "answers HTTP/2 (gRPC?), not HTTP/1.1"),
        ("grpcs", "answers TLS (an HTTPS or gRPC TLS port?), not plain HTTP"),
        ("https", "answers TLS (an HTTPS or gRPC TLS port?), not plain HTTP"),
    ],
)
def test_another_port_of_the_broker_is_refused_naming_what_answered(broker, listener, what):
    address = broker.addresses[listener]
    assert refusal(check_broker, address, "alice") == (
        f"broker {address} of party alice {what}; parties.alice.broker must be the broker's "
        "HTTP PTP port (http.port)"
    )


@pytest.mark.parametrize(
    "make, what",
    [
        (lambda: _listener(b"SSH-2.0-OpenSSH_9.6\r\n"), "answers something that is not HTTP"),
        (lambda: _listener(b"HTTP/1.1 404 Not Found\r\n\r\n"), "answers HTTP 404 at /health"),
        (lambda: _listener(b"HTTP/1.1 200 OK\r\n\r\n[1, 2]"), "its /health is not a psi-broker"),
        (lambda: _listener(None), "accepts connections but sends no HTTP answer within 1 s"),
        (_closed_port, "does not answer (Connection refused)"),
        (lambda: "no-such-host.invalid:9380", "does not answer (its host name does not resolve)"),
    ],
)
def test_an_address_without_a_broker_is_refused_naming_what_answered(make, what) -> None:
    address = make()
    text = refusal(lambda: finishes(lambda: check_broker(address, "alice", timeout_s=1), 10))
    assert text.startswith(f"broker {address} of party alice ")
    assert what in text


# --- through the CLI -------------------------------------------------------------------------


def cli_refusal(tmp_path: Path, **alice: str) -> str:
    """``psi-run --check`` as alice with ``alice``'s settings overridden: its one line (exit 3)."""
    (tmp_path / "a.csv").write_text("uid\nu1\n")
    doc = {
        "job_id": "hostile-input",
        "keys": ["uid"],
        "receiver": "alice",
        "timeout_s": 10,
        "parties": {
            "alice": {"broker": _closed_port(), "input": "a.csv", "output": "out/a.csv", **alice},
            "bob": {"broker": "127.0.0.1:9", "input": "b.csv", "output": "out/b.csv"},
        },
    }
    spec = tmp_path / "job.yaml"
    spec.write_text(yaml.safe_dump(doc, sort_keys=False))
    r = subprocess.run(
        psi_run_command(spec, "alice", tmp_path / "logs", "--check"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 3, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == "", r.stderr
    lines = [
        ln
        for ln in r.stderr.splitlines()
        if not ln.startswith((PREFIX + "log file ", PREFIX + "progress:"))
    ]
    assert len(lines) == 1 and len(lines[0]) <= LINE_MAX, r.stderr
    return lines[0]


def test_cli_refuses_a_fifo_input_at_once(tmp_path, fifo) -> None:
    line = cli_refusal(tmp_path, input=str(fifo))
    assert "is a named pipe (FIFO), not a regular file" in line


def test_cli_refuses_dev_null_as_output(tmp_path) -> None:
    line = cli_refusal(tmp_path, output="/dev/null")
    assert line.startswith(PREFIX + "output /dev/null: is a character device")


def test_cli_refuses_random_bytes_as_input(tmp_path) -> None:
    (tmp_path / "random.csv").write_bytes(b"\xc3\x28" + os.urandom(1 << 20))
    line = cli_refusal(tmp_path, input="random.csv")
    assert "not UTF-8 text (byte 0xc3 at line 1, byte offset 0)" in line


def test_cli_refuses_the_grpc_port_as_broker(tmp_path, broker) -> None:
    line = cli_refusal(tmp_path, broker=broker.addresses["grpc"])
    assert "answers HTTP/2 (gRPC?)" in line
    assert "parties.alice.broker must be the broker's HTTP PTP port (http.port)" in line


# --- generated inputs (hypothesis) -----------------------------------------------------------

PIECES = [
    b"a", b"uid", b",", b"\n", b"\r\n", b"\r", b"\x00", b'"', b"\xe2\x82\xac", b"\xe2\x82",
    b"\xf0\x9f\x99\x82", b"\xf0\x9f", b"\xff", b"\xc3", b"\xa9", b"\xed\xa0\x80", b"\xef\xbb\xbf",
    b"abcdefghij" * 3,
]  # fmt: skip
contents = st.binary(max_size=200) | st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)
GENERATED = settings(
    max_examples=300,
    deadline=2000,  # ms per example; each takes a few
    database=None,  # no .hypothesis folder in the tree
    suppress_health_check=[HealthCheck.too_slow],
)


def whole_file_problems(raw: bytes, cap: int) -> list[tuple[int, str, int, int]]:
    """Each first problem of ``raw`` with line cap ``cap``, in file order:
    (where it shows, kind, the offset a message names, the line it names)."""
    found = []
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        found.append((exc.start, "utf8", exc.start, raw.count(b"\n", 0, exc.start) + 1))
    if b"\0" in raw:
        at = raw.index(b"\0")
        found.append((at, "nul", at, raw.count(b"\n", 0, at) + 1))
    start = 0
    for number, line in enumerate(raw.split(b"\n"), 1):
        if len(line) > cap:
            found.append((start + cap, "long", start, number))
            break
        start += len(line) + 1
    return sorted(found)


def scan_verdict(message: str) -> tuple[str, int, int]:
    long = re.search(r"line (\d+) \(from byte offset (\d+)\) is longer than", message)
    if long:
        return "long", int(long[2]), int(long[1])
    found = re.search(r"(UTF-8|CSV) text \(.* at line (\d+), byte offset (\d+)\)", message)
    assert found, message
    return ("utf8" if found[1] == "UTF-8" else "nul"), int(found[3]), int(found[2])


@GENERATED
@given(raw=contents, cap=st.integers(1, 24), chunk=st.integers(1, 24))
def test_the_streaming_scan_agrees_with_a_whole_file_check(raw, cap, chunk) -> None:
    chunk = min(chunk, cap)  # the scan's own rule: a chunk is at most the line cap
    fd = os.memfd_create("scan")
    try:
        os.write(fd, raw)
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(data, "LINE_MAX_BYTES", cap)
            mp.setattr(data, "_SCAN_CHUNK", chunk)
            try:
                scan_text(fd, "input x.csv")
                got = None
            except PreflightError as exc:
                got = scan_verdict(str(exc))
    finally:
        os.close(fd)
    problems = whole_file_problems(raw, cap)
    if not problems:
        assert got is None
        return
    # The first problem, except that a character cut short by the end of the file is known to
    # be bad only there: a line found too long in its last three bytes comes first then.
    shows = {(kind, at, line): where for where, kind, at, line in problems}
    assert got in shows, (got, problems)
    assert shows[got] == problems[0][0] or (
        problems[0][1] == "utf8" and shows[got] <= problems[0][0] + 3
    ), (got, problems)


@pytest.fixture(scope="module")
def input_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inputs")


@GENERATED
@given(
    raw=(st.sampled_from([b"", b"uid\n", b"uid,v\n", b"v,uid\r\n"]) | contents).flatmap(
        lambda head: contents.map(lambda body: head + body)
    ),
    keys=st.sampled_from([("uid",), ("uid", "v"), ("a",)]),
    duplicates=st.booleans(),
)
def test_generated_inputs_give_a_table_or_a_short_preflight_error(
    input_dir, raw, keys, duplicates
) -> None:
    path = input_dir / "in.csv"
    path.write_bytes(raw)
    try:
        table = inspect_input(path, keys, duplicates)
    except PreflightError as exc:
        text = str(exc)
        assert "\n" not in text and len(PREFIX + text) <= LINE_MAX, text
        assert text.isprintable(), repr(text)
        return
    assert set(keys) <= set(table.columns)
    assert b"\0" not in raw
