"""A hostile or careless client against real psi-broker processes, on both front ends.

Every malformed header, metadata entry, body or pop timeout gets a PTP code (or, for what
aiohttp itself cannot parse, a plain HTTP 4xx), promptly; the broker logs one short line for
it, never a traceback, stays up, and gives the memory of a storm back. Property-based tests
send generated requests (hypothesis); one regular test covers each class of bad input.

Run as a script to measure a longer storm, with RSS numbers:
``PYTHONPATH=. .venv/bin/python tests/test_broker_hostile.py 5000``.
"""

from __future__ import annotations

import random
import re
import socket
import ssl
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import grpc
import pytest
from conftest import self_signed_cert, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import codes
from broker.edge import POP_TIMEOUT_MAX_MS, Refusal, pop_timeout, pop_timeout_ms
from broker.envelope import Envelope
from broker.proto import http_ptp_pb2, ptp_pb2
from harness.localnet import LocalBroker, start_pair

PTP_CODES = {v for k, v in vars(codes).items() if k.isupper() and isinstance(v, str)}
CHAN = "/v1/interconn/chan/"
PROTOCOL = "/org.ppc.ptp.PrivateTransferProtocol/"
TRANSPORT = "/org.ppc.ptp.PrivateTransferTransport/"
PTP_HEADERS = [
    "x-ptp-session-id",
    "x-ptp-topic",
    "x-ptp-source-node-id",
    "x-ptp-target-node-id",
    "x-ptp-source-inst-id",
    "x-ptp-target-inst-id",
    "x-ptp-trace-id",
    "x-ptp-token",
    "x-ptp-hops",
]
# Short waits, so that a generated pop that is valid answers quickly; memory trimmed often.
PROPERTIES = {"consume.msg.waiting.timeout": "300", "memory.trim.interval": "1000"}
SETTINGS = settings(
    max_examples=250,
    deadline=None,  # each call has its own timeout; a slow shared machine is not a failure
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


# ---------------------------------------------------------------------------------------------
# Clients that send exactly the bytes they are given


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def raw_http(port: int, data: bytes, timeout: float = 10.0, tls: bool = False) -> str:
    """Send ``data`` as it is; the answer as ``ptp:<code>``, ``http:<status>`` or what
    happened instead (``closed``, ``timeout``)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        sock = ctx.wrap_socket(sock)
    chunks = []
    try:
        sock.sendall(data)
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        return "timeout"
    except (ConnectionError, ssl.SSLError):
        pass  # the server may close hard once it has answered
    finally:
        sock.close()
    resp = b"".join(chunks)
    if not resp.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")):  # aiohttp's parse errors say 1.0
        return "closed"
    status = resp[9:12].decode()
    if status != "200":
        return f"http:{status}"
    out = http_ptp_pb2.TransportOutbound()
    out.ParseFromString(resp.split(b"\r\n\r\n", 1)[1])
    return f"ptp:{out.code}"


def http_request(op: str, headers, body: bytes = b"", query: bytes = b"") -> bytes:
    lines = b"".join(k + b": " + v + b"\r\n" for k, v in headers)
    return (
        b"POST " + CHAN.encode() + op.encode() + query + b" HTTP/1.1\r\nHost: broker\r\n"
        b"Connection: close\r\n" + lines + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


def ptp(session: str, topic: str = "t", source: str = "alice", target: str = "bob"):
    pairs = [("x-ptp-session-id", session), ("x-ptp-topic", topic)]
    pairs += [("x-ptp-source-node-id", source)] + (
        [("x-ptp-target-node-id", target)] * bool(target)
    )
    return [(k.encode(), v.encode()) for k, v in pairs]


def grpc_call(channel, method: str, body: bytes, metadata=(), timeout: float = 10.0) -> str:
    """One unary call with a raw body; ``ptp:<code>`` or ``grpc:<status>``."""
    call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
    try:
        raw = call(body, metadata=metadata, timeout=timeout)
    except grpc.RpcError as exc:
        return f"grpc:{exc.code().name}"
    answer = ptp_pb2.Outbound() if method.startswith(PROTOCOL) else ptp_pb2.TransportOutbound()
    answer.ParseFromString(raw)
    return f"ptp:{answer.code}"


def md(session: str, source: str = "alice", target: str = "bob", topic: str = "t"):
    pairs = [("x-ptp-session-id", session), ("x-ptp-topic", topic)]
    pairs.append(("x-ptp-source-node-id", source))
    return tuple(pairs + ([("x-ptp-target-node-id", target)] if target else []))


def push_body(payload: bytes = b"x", topic: str = "t") -> bytes:
    return ptp_pb2.PushInbound(topic=topic, payload=payload).SerializeToString()


def logs(broker: LocalBroker) -> tuple[str, str]:
    folder = broker.log_dir or broker.conf_dir / "logs"
    read = lambda name: (folder / name).read_text(encoding="utf-8", errors="replace")  # noqa: E731
    return read("broker.log"), read("broker-error.log")


def assert_healthy(broker: LocalBroker, other: LocalBroker | None = None) -> None:
    """Alive, no traceback or error logged, and a normal push and pop still work."""
    assert broker.proc is not None and broker.proc.poll() is None, "the broker died"
    main, errors = logs(broker)
    assert "Traceback" not in main and errors == "", errors[-2000:] or main[-2000:]
    session = f"ok{random.randrange(10**9)}"
    target = other.party if other else broker.party
    pushed = raw_http(broker.http_port, http_request("push", ptp(session, target=target), b"hi"))
    assert pushed == f"ptp:{codes.OK}"
    consumer = other or broker
    popped = raw_http(
        consumer.http_port,
        http_request("pop", ptp(session, source=target, target=""), query=b"?timeout=5"),
    )
    assert popped == f"ptp:{codes.OK}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    brokers = start_pair(tmp_path_factory.mktemp("hostile"), properties=PROPERTIES)
    yield brokers
    for b in brokers:
        b.stop()


@pytest.fixture(scope="module")
def channel(pair):
    with grpc.insecure_channel(f"127.0.0.1:{pair[0].grpc_port}") as ch:
        yield ch


# ---------------------------------------------------------------------------------------------
# Generated requests


def _no_crlf(raw: bytes) -> bytes:
    # A CR or LF would end the header line early and frame the request anew; that is aiohttp's
    # parser's business (the regular tests below send such framing on purpose).
    return raw.replace(b"\r", b"").replace(b"\n", b"")


header_values = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=80).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.from_regex(rb"\A[0-9]{1,14}\Z"),
    st.sampled_from(
        ["١٢", "²", "9" * 5000, "nan", "-1", "", " ", "alice", "bob", "s1", "é", "\udcff", "🙂"]
    ).map(lambda t: t.encode("utf-8", "surrogatepass")),
).map(_no_crlf)
header_names = st.one_of(
    st.sampled_from(PTP_HEADERS).flatmap(lambda n: st.sampled_from([n, n.upper(), n.title()])),
    st.from_regex(r"\A[A-Za-z0-9-]{1,20}\Z"),
).map(str.encode)
pop_queries = st.one_of(
    st.none(),
    st.floats(0, 0.3).map(lambda f: f"{f:.3f}"),
    st.sampled_from(["nan", "inf", "-1", "1e400", "1e300", "١", "99999999999", "86401", ""]),
    st.text(alphabet=st.characters(blacklist_categories=["Nd"]), max_size=20),
    # A lone surrogate is percent-encoded as its raw bytes: not UTF-8 at all on the wire.
).map(lambda v: b"" if v is None else b"?timeout=" + _quoted(v))


def _quoted(text: str) -> bytes:
    return quote(text, safe="", errors="surrogatepass").encode()


@SETTINGS
@given(
    op=st.sampled_from(["push", "pop", "peek", "release", "invoke"]),
    keep=st.lists(st.sampled_from(PTP_HEADERS[:4]), unique=True),
    extra=st.lists(st.tuples(header_names, header_values), max_size=6),
    body=st.binary(max_size=2048),
    query=pop_queries,
)
def test_generated_http_requests_get_a_ptp_code_or_a_plain_4xx(pair, op, keep, extra, body, query):
    alice, _bob = pair
    session = f"h{random.randrange(10**9)}"
    base = [(k, v) for k, v in ptp(session, source="bob" if op == "invoke" else "alice")]
    headers = [(k, v) for k, v in base if k.decode() in keep] + extra
    answer = raw_http(alice.http_port, http_request(op, headers, body, query))
    assert answer.startswith(("ptp:", "http:4")), answer
    if answer.startswith("ptp:"):
        assert answer[4:] in PTP_CODES


@pytest.fixture(scope="module", autouse=True)
def _after_all(pair):
    yield
    assert_healthy(pair[0], pair[1])


grpc_keys = st.one_of(st.sampled_from(PTP_HEADERS), st.from_regex(r"\A[a-z0-9_.-]{1,20}\Z")).filter(
    lambda k: not k.startswith("grpc-") and not k.endswith("-bin")
)
grpc_metadata = st.lists(
    st.one_of(
        st.tuples(grpc_keys, st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E))),
        st.tuples(grpc_keys, st.sampled_from(["9" * 5000, "nan", "-1", "", "alice", "bob"])),
        # Binary entries carry any bytes at all.
        st.tuples(grpc_keys.map(lambda k: k + "-bin"), st.binary(max_size=200)),
        st.tuples(st.sampled_from(PTP_HEADERS), st.text(min_size=1, max_size=4, alphabet="ab")),
    ),
    max_size=6,
)
message_maps = st.dictionaries(
    st.one_of(st.sampled_from(PTP_HEADERS), st.text(max_size=10)),
    st.one_of(st.text(max_size=30), st.sampled_from(["١٢", "9" * 5000, "é", "alice"])),
    max_size=4,
).filter(lambda m: all(_encodable(k) and _encodable(v) for k, v in m.items()))
# gRPC pop timeouts are milliseconds: generated ones are invalid (negative), 0 (the broker's
# short default) or short waits.
pop_timeouts = st.one_of(st.just(0), st.integers(-(2**31), -1), st.integers(1, 300))


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@st.composite
def grpc_bodies(draw, method: str) -> bytes:
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=512))  # not a message at all, most of the time
    topic = draw(st.one_of(st.just("t"), st.text(max_size=20)).filter(_encodable))
    payload = draw(st.binary(max_size=1024))
    if method == "invoke":
        msg = ptp_pb2.Inbound(metadata=draw(message_maps), payload=payload)
    elif method == "push":
        msg = ptp_pb2.PushInbound(topic=topic, payload=payload, metadata=draw(message_maps))
    elif method == "pop":
        msg = ptp_pb2.PopInbound(topic=topic, timeout=draw(pop_timeouts))
    elif method == "peek":
        msg = ptp_pb2.PeekInbound(topic=topic)
    else:
        msg = ptp_pb2.ReleaseInbound(topic=topic, timeout=draw(st.integers(-(2**31), 2**31 - 1)))
    return msg.SerializeToString()


@SETTINGS
@given(data=st.data(), keep=st.integers(0, 4), extra=grpc_metadata)
def test_generated_grpc_calls_get_a_ptp_code(pair, channel, data, keep, extra):
    method = data.draw(st.sampled_from(["invoke", "push", "pop", "peek", "release"]))
    body = data.draw(grpc_bodies(method))
    session = f"g{random.randrange(10**9)}"
    metadata = md(session, source="bob" if method == "invoke" else "alice")[:keep] + tuple(extra)
    path = (PROTOCOL if method == "invoke" else TRANSPORT) + method
    answer = grpc_call(channel, path, body, metadata)
    assert answer.startswith("ptp:") and answer[4:] in PTP_CODES, answer


@settings(SETTINGS, max_examples=60)
@given(messages=st.lists(st.one_of(st.binary(max_size=200), grpc_bodies("invoke")), max_size=4))
def test_generated_transport_streams_answer_every_message(pair, channel, messages):
    stream = channel.stream_stream(
        PROTOCOL + "transport", request_serializer=None, response_deserializer=None
    )
    metadata = md(f"st{random.randrange(10**9)}", source="bob", target="alice")
    answers = list(stream(iter(messages), metadata=metadata, timeout=10))
    assert len(answers) == len(messages)
    for raw in answers:
        out = ptp_pb2.Outbound()
        out.ParseFromString(raw)
        assert out.code in PTP_CODES


# ---------------------------------------------------------------------------------------------
# One regular test per class of bad input


def test_pop_timeout_that_is_not_plain_seconds_is_refused_at_once(pair, channel):
    alice, _ = pair
    session = f"pt{random.randrange(10**9)}"
    for value in (b"nan", b"inf", b"1e400", b"1e300", b"-1", b"99999999999", b"0x10", b"1_0"):
        request = http_request("pop", ptp(session, target=""), query=b"?timeout=" + value)
        assert raw_http(alice.http_port, request, timeout=5) == f"ptp:{codes.BAD_REQUEST}", value
    for value in (-5, -(2**31)):
        body = ptp_pb2.PopInbound(topic="t", timeout=value).SerializeToString()
        answer = grpc_call(channel, TRANSPORT + "pop", body, md(session, target=""), timeout=5)
        assert answer == f"ptp:{codes.BAD_REQUEST}", value


def test_hop_count_of_non_ascii_digits_or_thousands_of_digits_is_refused(pair, channel):
    alice, _ = pair
    session = f"hc{random.randrange(10**9)}"
    for hops in ("١٢", "²", "9" * 5000, "-1", "0x1"):
        headers = [*ptp(session), (b"x-ptp-hops", hops.encode())]
        answer = raw_http(alice.http_port, http_request("push", headers, b"x"))
        assert answer == f"ptp:{codes.BAD_REQUEST}", hops
    answer = grpc_call(
        channel, TRANSPORT + "push", push_body(), (*md(session), ("x-ptp-hops", "9" * 5000))
    )
    assert answer == f"ptp:{codes.BAD_REQUEST}"
    invoke = ptp_pb2.Inbound(metadata={"x-ptp-hops": "١٢"}, payload=b"x").SerializeToString()
    answer = grpc_call(channel, PROTOCOL + "invoke", invoke, md(session, "bob", "alice"))
    assert answer == f"ptp:{codes.BAD_REQUEST}"
    assert_healthy(alice, pair[1])


def test_header_values_that_could_not_be_passed_on_are_refused(pair, channel):
    """Bad UTF-8, lone surrogates and non-ASCII text in a trace id: refused at the edge, so
    nothing is stored that a gRPC pop could not send, and no forward fails to start."""
    alice, _ = pair
    session = f"tr{random.randrange(10**9)}"
    for target in ("bob", "alice"):  # forwarded over gRPC, and stored here
        for value in (b"\xff\xfe", b"\xed\xa0\x80", "é".encode(), "🙂".encode(), b"a\tb"):
            headers = [*ptp(session, source="bob", target=target), (b"x-ptp-trace-id", value)]
            answer = raw_http(alice.http_port, http_request("push", headers, b"x"))
            assert answer == f"ptp:{codes.BAD_REQUEST}", (target, value)
    pop = ptp_pb2.PopInbound(topic="t").SerializeToString()
    answer = grpc_call(channel, TRANSPORT + "pop", pop, md(session, source="alice", target=""))
    assert answer == f"ptp:{codes.POP_TIMEOUT}"
    assert_healthy(alice, pair[1])


def test_undecodable_grpc_messages_are_refused_with_a_ptp_code(pair, channel):
    session = f"ud{random.randrange(10**9)}"
    junk = b"\xff" * 40
    bad_utf8_map = b"\x0a\x07\x0a\x01a\x12\x02\xff\xfe"  # Inbound.metadata {"a": b"\xff\xfe"}
    for method, body in (
        (PROTOCOL + "invoke", junk),
        (PROTOCOL + "invoke", bad_utf8_map),
        (TRANSPORT + "push", junk),
        (TRANSPORT + "pop", junk),
        (TRANSPORT + "peek", junk),
        (TRANSPORT + "release", junk),
    ):
        assert grpc_call(channel, method, body, md(session)) == f"ptp:{codes.BAD_REQUEST}", method
    stream = channel.stream_stream(PROTOCOL + "transport", None, None)
    good = ptp_pb2.Inbound(payload=b"x").SerializeToString()
    answers = list(stream(iter([junk, good]), metadata=md(session, "bob", "alice"), timeout=10))
    codes_seen = [ptp_pb2.Outbound.FromString(a).code for a in answers]
    assert codes_seen == [codes.BAD_REQUEST, codes.OK]  # a bad message does not end the stream
    assert_healthy(pair[0], pair[1])


def test_a_ptp_header_given_twice_is_refused_on_both_front_ends(pair, channel):
    alice, _ = pair
    session = f"dup{random.randrange(10**9)}"
    headers = [*ptp(session), (b"X-PTP-Session-Id", b"other")]
    assert raw_http(alice.http_port, http_request("push", headers, b"x")) == (
        f"ptp:{codes.BAD_REQUEST}"
    )
    metadata = (*md(session), ("x-ptp-target-node-id", "alice"))
    assert grpc_call(channel, TRANSPORT + "push", push_body(), metadata) == (
        f"ptp:{codes.BAD_REQUEST}"
    )


def test_client_that_leaves_mid_body_is_not_an_error(pair):
    alice, _ = pair
    before = logs(alice)[0].count("\n")
    for _ in range(20):
        request = http_request("push", ptp(f"mb{random.randrange(10**9)}"), b"y" * 100_000)
        with socket.create_connection(("127.0.0.1", alice.http_port)) as sock:
            sock.sendall(request.replace(b"Content-Length: 100000", b"Content-Length: 900000"))
    time.sleep(0.5)
    new_lines = logs(alice)[0].splitlines()[before:]
    # A count of earlier tests' refusals may fall due meanwhile; it is not about this client.
    new_lines = [line for line in new_lines if not re.search(r"refused \d+ more", line)]
    assert not [line for line in new_lines if " WARNING " in line or " ERROR " in line]
    assert_healthy(alice, pair[1])


@pytest.fixture
def alone(tmp_path):
    """A broker of its own, whose log holds only what one test sent."""
    broker = LocalBroker("alice", tmp_path / "conf", dict(PROPERTIES))
    broker.write_config({})
    broker.start()
    yield broker
    broker.stop()


def test_requests_aiohttp_cannot_parse_get_4xx_and_one_short_line_each(alone):
    alice = alone
    head = b"POST /v1/interconn/chan/push HTTP/1.1\r\nHost: b\r\nConnection: close\r\n"
    malformed = [
        head + b"Content-Length: abc\r\n\r\n",
        head + b"Content-Length: -1\r\n\r\n",
        head + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        head + b"X-Long: " + b"a" * 10_240 + b"\r\n\r\n",
        head + b"Transfer-Encoding: bogus, chunked\r\n\r\nzz\r\n",
        head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        bytes(random.Random(7).randrange(256) for _ in range(300)) + b"\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40 + b"\r\n\r\n",  # TLS hello
    ]
    for request in malformed:
        answer = raw_http(alice.http_port, request)
        assert answer.startswith("http:4"), (answer, request[:80])
    main, errors = logs(alice)
    assert "Traceback" not in main and errors == ""
    refused = [line for line in main.splitlines() if "refused http request from 127.0.0.1:" in line]
    # One line each (with the reason); aiohttp logs a first request that is not HTTP at all
    # (the last two) at DEBUG only, which broker.log does not keep.
    assert len(refused) >= len(malformed) - 2
    assert not [line for line in refused if "aaaa" in line]  # the refused bytes are not quoted
    assert max(len(line) for line in main.splitlines()) < 400


def test_a_library_record_about_a_request_that_is_not_http_is_a_refusal_line(caplog):
    import logging

    from aiohttp.http_exceptions import BadHttpMethod

    from broker.refusals import LibraryLogFilter, RefusalLog

    try:
        raise BadHttpMethod("\x16\x03\x01secret")
    except BadHttpMethod:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "broker.http.server",
        logging.DEBUG,
        __file__,
        1,
        "Error handling request from %s",
        ("192.0.2.7",),
        exc_info,
    )
    with caplog.at_level(logging.WARNING, logger="broker.edge"):
        assert LibraryLogFilter(RefusalLog(), "http request").filter(record) is False
    assert "refused http request from 192.0.2.7: BadHttpMethod: " in caplog.text
    assert "secret" not in caplog.text


def test_refusal_lines_are_rate_limited(alone):
    for i in range(200):
        headers = [*ptp(f"rl{i}", target="alice"), (b"x-ptp-hops", b"x")]
        raw_http(alone.http_port, http_request("push", headers, b"x"))
    refused = [line for line in logs(alone)[0].splitlines() if "refused" in line]
    assert 1 <= len(refused) <= 20
    assert "127.0.0.1:" in refused[0] and "x-ptp-hops" in refused[0]
    alone.stop()
    assert re.search(r"refused \d+ more malformed requests", logs(alone)[0])  # counted, not lost


def test_pops_of_sessions_that_never_come_leave_no_queues(pair, channel):
    alice, _ = pair
    before = alice.health()["queues"]
    for i in range(100):
        query = b"?timeout=0" if i % 2 else b"?timeout=0.01"
        raw_http(alice.http_port, http_request("pop", ptp(f"nq{i}", target=""), query=query))
    assert alice.health()["queues"] <= before


def test_https_token_that_is_not_utf8_is_refused_as_a_wrong_token(tmp_path):
    cert, key = self_signed_cert(tmp_path / "pki")
    broker = LocalBroker(
        "alice",
        tmp_path / "conf",
        {
            "auth.token": "s3cret",
            "open.https.server": "true",
            "https.port": "0",
            "https.server.cert.chain.file": str(cert),
            "https.server.private.key.file": str(key),
        },
    )
    broker.write_config({"bob": {"default": [{"ip": "127.0.0.1", "port": 9}]}})
    broker.start()
    try:
        port = int(broker.addresses["https"].rsplit(":", 1)[1])
        answers = {}
        for token in (b"wrong", b"\xff\xfe", b"\xed\xa0\x80", "s3cret\u00e9".encode()):
            headers = [*ptp("k1", source="bob", target="alice"), (b"x-ptp-token", token)]
            answers[token] = raw_http(port, http_request("invoke", headers, b"x"), tls=True)
        assert set(answers.values()) == {f"ptp:{codes.UNAUTHORIZED}"}, answers
        main, errors = logs(broker)
        assert "Traceback" not in main and errors == ""
        assert "s3cret" not in main  # tokens are never logged
    finally:
        broker.stop()


def test_forward_whose_call_cannot_start_gets_a_ptp_code(pair, tmp_path):
    """A route whose client was closed under a message is made anew; a peer that does not
    speak HTTP on an HTTP route is named in a PTP answer, not an HTTP 500."""
    import asyncio

    from broker.forward import Forwarder
    from broker.routes import Route

    _alice, bob = pair

    async def closed_then_send() -> tuple[str, str]:
        forwarder = Forwarder(retry_timeout_s=5)
        route = Route(party="bob", protocol="grpc", ip="127.0.0.1", port=bob.grpc_port)
        await forwarder._hop(route).close()  # as a route edit or a stop does
        env = Envelope.parse(ptp("fw1", source="alice", target="bob"))
        code, message, _ = await forwarder.send((route,), env, b"x")
        await forwarder.close()
        return code, message

    assert asyncio.run(closed_then_send())[0] == codes.OK

    url = f"http://127.0.0.1:{bob.grpc_port}/v1/interconn/chan/invoke"  # a gRPC port
    carol = LocalBroker("carol", tmp_path / "carol", dict(PROPERTIES))
    carol.write_config({"bob": {"default": [{"protocol": "http", "url": url}]}})
    carol.start()
    try:
        # carol's broker keeps the push in its outbox and answers OK; the forward fails, is
        # logged, and the next push on that queue is told.
        push = http_request("push", ptp("fw2", source="carol"), b"x")
        assert raw_http(carol.http_port, push) == f"ptp:{codes.OK}"
        assert wait_for(lambda: raw_http(carol.http_port, push) == f"ptp:{codes.INTERNAL}")
        assert "did not answer in HTTP" in logs(carol)[1]
        assert "Traceback" not in logs(carol)[0]
    finally:
        carol.stop()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", 300.0), ("0", 0.0), ("2", 2.0), ("0.25", 0.25), (" 5 ", 5.0), ("86400", 86400.0)],
)
def test_pop_timeout_rule_accepts_plain_seconds(raw, expected):
    assert pop_timeout(raw, 300.0) == expected


@pytest.mark.parametrize(
    "raw", ["nan", "inf", "1e3", "-1", "+1", "١", "1.", ".5", "86401", "9" * 40]
)
def test_pop_timeout_rule_refuses_everything_else(raw):
    with pytest.raises(Refusal) as info:
        pop_timeout(raw, 300.0)
    assert info.value.code == codes.BAD_REQUEST and raw not in info.value.reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(0, 300.0), (1, 0.001), (1500, 1.5), (36_000_000, 36_000.0), (2**31 - 1, 2_147_483.647)],
)
def test_grpc_pop_timeout_is_milliseconds_and_0_means_the_default(raw, expected):
    assert pop_timeout_ms(raw, 300.0) == expected


@pytest.mark.parametrize("raw", [-1, -(2**31), POP_TIMEOUT_MAX_MS + 1])
def test_grpc_pop_timeout_rule_refuses_negative_or_over_int32(raw):
    with pytest.raises(Refusal) as info:
        pop_timeout_ms(raw, 300.0)
    assert info.value.code == codes.BAD_REQUEST


# ---------------------------------------------------------------------------------------------
# Memory


def _storm(alice: LocalBroker, count: int, workers: int = 24) -> dict[str, int]:
    """Large and malformed requests from ``workers`` threads at once; outcome counts."""
    outcomes: dict[str, int] = {}
    lock = threading.Lock()

    def one(i: int) -> None:
        rng = random.Random(i)
        size = rng.choice([1_000_000, 3_000_000, 6_000_000])
        kind = i % 4
        if kind == 0:  # the client leaves half way through its body
            request = http_request("push", ptp(f"m{i}"), b"y" * size)
            with socket.create_connection(("127.0.0.1", alice.http_port), timeout=10) as sock:
                sock.sendall(request[: len(request) - size // 2])
            outcome = "left"
        elif kind == 1:  # a whole body behind a header the edge refuses
            headers = [*ptp(f"m{i}"), (b"x-ptp-hops", b"9" * 5000)]
            outcome = raw_http(alice.http_port, http_request("push", headers, b"y" * size))
        elif kind == 2:  # megabytes that are not a protobuf message
            with grpc.insecure_channel(f"127.0.0.1:{alice.grpc_port}") as ch:
                outcome = grpc_call(ch, TRANSPORT + "push", b"\xff" * size, md(f"m{i}"))
        else:
            headers = [*ptp(f"m{i}"), (b"x-ptp-trace-id", b"\xff" * 100)]
            outcome = raw_http(alice.http_port, http_request("push", headers, b"z" * size))
        with lock:
            outcomes[outcome] = outcomes.get(outcome, 0) + 1

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(count)))
    return outcomes


def anon_mb(pid: int) -> float:
    """The process's anonymous memory (its heaps), MB: RSS without mapped files, whose pages
    come and go with the code paths a request happens to run."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no RssAnon for {pid}")


def _settled(pid: int, seconds: float = 2.5) -> float:
    """Anonymous memory once the broker has trimmed (memory.trim.interval is 1 s here): the
    least of samples over ``seconds``, so a request still being let go does not count."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(anon_mb(pid))
        time.sleep(0.25)
    return min(samples)


# Measured here (2 cores, under two busy loops): after a storm of 240 the heap settles 2 to
# 28 MB above its start, and the next storm moves it either way (28 -> 16, 11 -> 2): pages
# pinned by what is still alive where the storm's buffers were, not a growth. A leak grows
# with every storm. So three storms, and the *least* excess must stay under the margin: noise
# in all three at once does not reach it (the least was 2 to 16 MB in 5 runs), a broker that
# keeps a sixth of the gRPC bodies does (excess 42, 83, 124 MB), as does any leak of more than
# the margin per storm.
STORMS = 3
MARGIN_MB = 25.0


def test_memory_returns_near_its_baseline_after_a_storm(tmp_path):
    alice, bob = start_pair(tmp_path / "m", properties=PROPERTIES)
    try:
        pid = alice.proc.pid
        assert_healthy(alice, bob)  # warm: every code path that imports lazily has run
        baseline = _settled(pid)
        peak = baseline
        sampler_stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not sampler_stop.wait(0.2):
                peak = max(peak, anon_mb(pid))

        sampler = threading.Thread(target=sample)
        sampler.start()
        excess, outcomes = [], {}
        try:
            for _ in range(STORMS):
                for outcome, n in _storm(alice, 240).items():
                    outcomes[outcome] = outcomes.get(outcome, 0) + n
                excess.append(round(_settled(pid) - baseline, 1))
        finally:
            sampler_stop.set()
            sampler.join()
        print(f"heap MB: baseline {baseline:.0f}, peak {peak:.0f}, excess {excess}; {outcomes}")
        assert set(outcomes) <= {"left", f"ptp:{codes.BAD_REQUEST}"}, outcomes
        assert min(excess) <= MARGIN_MB, (baseline, peak, excess)
        assert_healthy(alice, bob)
    finally:
        alice.stop()
        bob.stop()


if __name__ == "__main__":  # a longer storm, with numbers
    import tempfile

    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
    with tempfile.TemporaryDirectory() as tmp:
        a, b = start_pair(Path(tmp), properties={"consume.msg.waiting.timeout": "300"})
        try:
            time.sleep(1.5)
            base = rss_mb(a.proc.pid)
            t0 = time.monotonic()
            result = _storm(a, count)
            took = time.monotonic() - t0
            print(f"{count} requests in {took:.0f} s: {result}")
            print(f"RSS MB: before {base:.0f}, end of storm {rss_mb(a.proc.pid):.0f}", end="")
            for later in (5, 10, 15, 20, 30):  # memory.trim.interval is 10 s by default
                time.sleep(5 if later < 30 else 10)
                print(f", {later} s later {rss_mb(a.proc.pid):.0f}", end="", flush=True)
            print()
        finally:
            a.stop()
            b.stop()
