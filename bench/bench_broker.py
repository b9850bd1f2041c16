"""Benchmark: a broker pair's throughput, beside raw loopback as the ceiling, in one run.

The path is a PSI's: a producer pushes to alice's broker, which sends each message on to
bob's broker (gRPC ``invoke``; ``--forward http`` for the HTTP route), where a consumer pops
it. One producer, sequential (it waits for each push's answer, as SPU's link does), and one
consumer popping at the same time, for each ingress

  * ``http``: ``POST /v1/interconn/chan/push`` and ``.../pop?timeout=N`` (SPU's yacl link);
  * ``grpc``: OSX ``PrivateTransferTransport.push`` and ``.pop``;

and each queue mode (``queue.durable = false`` / ``true``): MB/s with 1 MB messages and
messages/s with 1 KB messages. In the same run: one TCP stream over 127.0.0.1 (MB/s) and a
1 KB request/answer ping-pong (msg/s), the ceiling; and the same clients against a trivial
server (one process, one queue, no forwarding), which shows that the clients are not the
limit. See bench/README.md.

    .venv/bin/python bench/bench_broker.py [--seconds N] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repo's harness/ and broker/
from broker import codes  # noqa: E402
from broker.proto import ptp_pb2  # noqa: E402
from broker.proto.http_ptp_pb2 import TransportOutbound  # noqa: E402
from harness.localnet import LocalBroker, route_to  # noqa: E402

BIG, SMALL = 1 << 20, 1 << 10  # message sizes: MB/s with BIG, messages/s with SMALL
WARMUP = 5  # untimed messages first: connections, the forward route's client
POP_WAIT_S = 2  # HTTP ?timeout= is in seconds, gRPC PopInbound.timeout in milliseconds
# "Nothing came in time": E0000000601 as OSX answers it (E0000000404 from brokers before it).
_EMPTY_POP = getattr(codes, "POP_TIMEOUT", codes.NOT_FOUND)
_NOTHING = {_EMPTY_POP, codes.NOT_FOUND}
TARGET_MBPS, TARGET_MSGPS = 500, 2000  # issue 10, durable mode, this 2-core box
_TICK = os.sysconf("SC_CLK_TCK")
_END = b"end"  # the producer's last message: the consumer stops on it (not counted)


class BenchError(RuntimeError):
    """A broker answered wrongly or a message went missing: the benchmark stops."""


def raise_malloc_thresholds() -> None:
    """Free one mapped 8 MB block, which raises glibc's mmap and trim thresholds: without it
    the heap shrinks and regrows with every 1 MB message and this client pays the page
    faults (the brokers may do the same, see broker/memory.py)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to raise
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc.argtypes, libc.malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
        libc.free.argtypes, libc.free.restype = [ctypes.c_void_p], None
        libc.free(libc.malloc(8 << 20))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


# --------------------------------------------------------------------------------------------
# clients: as cheap as Python allows, so that the brokers are what is measured


class HttpPtp:
    """PTP over HTTP/1.1 on one keep-alive socket; reads only the status line, the
    Content-Length and the body (http.client's header parsing costs more than it needs to)."""

    def __init__(self, address: str, session: str, topic: str, me: str, peer: str = "") -> None:
        host, port = address.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb", buffering=1 << 16)
        base = f"Host: {address}\r\nx-ptp-session-id: {session}\r\nx-ptp-topic: {topic}\r\n"
        self.push_head = (
            f"POST /v1/interconn/chan/push HTTP/1.1\r\n{base}"
            f"x-ptp-source-node-id: {me}\r\nx-ptp-target-node-id: {peer}\r\n"
        ).encode()
        self.pop_head = (
            f"POST /v1/interconn/chan/pop?timeout={POP_WAIT_S} HTTP/1.1\r\n{base}"
            f"x-ptp-source-node-id: {me}\r\nContent-Length: 0\r\n\r\n"
        ).encode()

    def _answer(self) -> TransportOutbound:
        status = self.reader.readline()
        if not status.startswith(b"HTTP/1.1 200 "):
            raise BenchError(f"HTTP answer {status[:60]!r}")
        length = -1
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.lower() == b"content-length":
                length = int(value)
        if length < 0:
            raise BenchError("HTTP answer without Content-Length")
        return TransportOutbound.FromString(self.reader.read(length))

    def push(self, payload: bytes) -> tuple[str, str]:
        head = self.push_head + b"Content-Length: %d\r\n\r\n" % len(payload)
        if len(payload) < 1 << 16:
            self.sock.sendall(head + payload)
        else:  # no 1 MB copy just to prepend the header
            self.sock.sendall(head)
            self.sock.sendall(payload)
        out = self._answer()
        return out.code, out.message

    def pop(self) -> tuple[str, bytes]:
        self.sock.sendall(self.pop_head)
        out = self._answer()
        return out.code, out.payload

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class GrpcPtp:
    """OSX ``PrivateTransferTransport`` push and pop with grpc's sync stubs, one connection.

    A push is encoded here, field by field as protobuf writes it (topic, payload, metadata),
    because protobuf's own encoder takes 1.5 ms for a 1 MB payload (it copies it three
    times) and would make this client the bottleneck."""

    def __init__(self, address: str, session: str, topic: str, me: str, peer: str = "") -> None:
        self.channel = grpc.insecure_channel(
            address,
            options=[
                ("grpc.max_send_message_length", 1 << 30),
                ("grpc.max_receive_message_length", 1 << 30),
                ("grpc.use_local_subchannel_pool", 1),  # producer and consumer: own sockets
                ("grpc.enable_http_proxy", 0),
            ],
        )
        service = "/org.ppc.ptp.PrivateTransferTransport/"
        out = ptp_pb2.TransportOutbound.FromString
        self._push = self.channel.unary_unary(service + "push", response_deserializer=out)
        self._pop = self.channel.unary_unary(
            service + "pop",
            request_serializer=ptp_pb2.PopInbound.SerializeToString,
            response_deserializer=out,
        )
        self.topic = topic
        self.push_head = ptp_pb2.PushInbound(topic=topic).SerializeToString()
        self.push_md = (
            ("x-ptp-session-id", session),
            ("x-ptp-source-node-id", me),
            ("x-ptp-target-node-id", peer),
        )
        self.pop_md = (("x-ptp-session-id", session), ("x-ptp-source-node-id", me))

    def push(self, payload: bytes) -> tuple[str, str]:
        request = b"".join((self.push_head, b"\x12", _varint(len(payload)), payload))
        out = self._push(request, metadata=self.push_md, timeout=60)
        return out.code, out.message

    def pop(self) -> tuple[str, bytes]:
        request = ptp_pb2.PopInbound(topic=self.topic, timeout=POP_WAIT_S * 1000)
        out = self._pop(request, metadata=self.pop_md, timeout=POP_WAIT_S + 10)
        return out.code, out.payload

    def close(self) -> None:
        self.channel.close()


CLIENTS = {"http": HttpPtp, "grpc": GrpcPtp}


# --------------------------------------------------------------------------------------------
# one measurement: a sequential producer and a concurrent consumer


@dataclass
class Result:
    size: int
    messages: int
    seconds: float
    cpu: dict[str, float]  # CPU seconds each process used while measuring (all threads)

    @property
    def mbps(self) -> float:
        return self.messages * self.size / self.seconds / 1e6

    @property
    def msgps(self) -> float:
        return self.messages / self.seconds


def _push(client, payload: bytes) -> None:
    while True:
        code, message = client.push(payload)
        if code == codes.OK:
            return
        if code != codes.QUEUE_FULL:  # full: the consumer is behind; retry as SPU does
            raise BenchError(f"push answered {code}: {message}")
        time.sleep(0.01)


def _consume(client, first: int, size: int, box: dict) -> None:
    expected = first
    try:
        while True:
            code, payload = client.pop()
            if code in _NOTHING:
                continue  # the producer is slow or done; the end marker decides
            if code != codes.OK:
                raise BenchError(f"pop answered {code}")
            if payload == _END:
                break
            seq = int.from_bytes(payload[:8], "big")
            if len(payload) != size or seq != expected:
                raise BenchError(f"popped message {seq} ({len(payload)} B), wanted {expected}")
            expected += 1
            box["last"] = time.perf_counter()
        box["received"] = expected - first
    except BaseException as exc:  # noqa: BLE001 - handed to the producer's thread
        box["error"] = exc


def measure(producer, consumer, size: int, seconds: float, pids: dict[str, int]) -> Result:
    """Push ``size``-byte messages for ``seconds``, one at a time, while ``consumer`` pops
    them; time from the first push to the last message popped."""
    filler = b"\xa5" * (size - 8)  # compressible, as gRPC compression is off anyway

    def payload(seq: int) -> bytes:
        return seq.to_bytes(8, "big") + filler

    for seq in range(WARMUP):
        _push(producer, payload(seq))
        code, got = consumer.pop()
        if code != codes.OK or got[:8] != payload(seq)[:8]:
            raise BenchError(f"warm-up message {seq} did not come through (pop: {code})")
    box: dict = {}
    thread = threading.Thread(target=_consume, args=(consumer, WARMUP, size, box), daemon=True)
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client0 = time.process_time()
    thread.start()
    started = time.perf_counter()
    sent = 0
    while time.perf_counter() - started < seconds and "error" not in box:
        _push(producer, payload(WARMUP + sent))
        sent += 1
    _push(producer, _END)
    thread.join(POP_WAIT_S + 30)
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    cpu["client"] = time.process_time() - client0
    if "error" in box:
        raise box["error"]
    if thread.is_alive() or box.get("received") != sent:
        raise BenchError(f"{sent} messages pushed, {box.get('received', 0)} popped")
    return Result(size, sent, box["last"] - started, cpu)


# --------------------------------------------------------------------------------------------
# broker pairs: one per variant (source tree, event loop, forward protocol) and queue mode


@dataclass(frozen=True)
class Variant:
    label: str
    tree: Path | None  # broker sources (PYTHONPATH of the broker processes); None: installed
    loop: str  # PSI_BROKER_LOOP: uvloop or asyncio
    forward: str  # route protocol alice -> bob


@dataclass
class Pair:
    variant: Variant
    mode: str  # requested: memory or durable
    brokers: list[LocalBroker]
    reported: str = ""
    results: dict[tuple[str, int], list[Result]] = field(default_factory=dict)

    @property
    def pids(self) -> dict[str, int]:
        return {b.party: b.proc.pid for b in self.brokers if b.proc}

    @property
    def name(self) -> str:
        return " ".join(x for x in (self.variant.label, self.mode) if x)


@contextlib.contextmanager
def _environ(**values: str | None):
    """``os.environ`` with ``values`` set (None: removed) while the block runs; a broker
    started inside inherits them (LocalBroker passes the bench's environment on)."""
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_pair(root: Path, variant: Variant, mode: str) -> Pair:
    """alice's and bob's brokers routed to each other, as ``harness.localnet.start_pair``
    makes them, but each with its own ``queue.store.dir``."""
    env = {"PSI_BROKER_LOOP": variant.loop}
    if variant.tree is not None:
        env["PYTHONPATH"] = str(variant.tree)
    brokers = []
    for party in ("alice", "bob"):
        props = {"queue.durable": "false" if mode == "memory" else "true"}
        if mode != "memory":
            props["queue.store.dir"] = str(root / f"store-{party}")
        if mode == "fsync":  # durable, each record flushed to the disk before the OK
            props["queue.store.fsync"] = "true"
        brokers.append(LocalBroker(party, root / f"broker-{party}", props))
    pair = Pair(variant, mode, brokers)
    try:
        with _environ(**env):
            for b in brokers:
                b.write_config({})
                b.start()
        alice, bob = brokers
        alice.write_routes({"bob": {"default": route_to(bob, variant.forward)}})
        bob.write_routes({"alice": {"default": route_to(alice, variant.forward)}})
        for b, other in ((alice, "bob"), (bob, "alice")):
            b.wait_routes([other])
        pair.reported = queue_mode(alice)
    except BaseException:
        stop_pair(pair)
        raise
    return pair


def stop_pair(pair: Pair) -> None:
    for b in pair.brokers:
        b.stop()


def queue_mode(broker: LocalBroker) -> str:
    """The queue mode as the broker reports it: its /health if it tells, else its log (a
    durable broker logs "durable queues in DIR: ... recovered" at start)."""
    health = broker.health()
    if "durable" in health:
        return f"durable: {health['durable']}"
    log = (broker.log_dir or broker.conf_dir / "logs") / "broker.log"
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if "unknown keys" in line and "queue.durable" in line:
            return "durable: not available"
        if "durable queues in " in line:
            return "durable: on, store " + line.split("durable queues in ", 1)[1].split(":")[0]
    return "durable: off"


def run_case(pair: Pair, ingress: str, size: int, seconds: float, profile: Profiler | None):
    alice, bob = pair.brokers
    address = alice.http if ingress == "http" else alice.addresses["grpc"]
    bob_address = bob.http if ingress == "http" else bob.addresses["grpc"]
    session = f"bench-{ingress}-{size}-{time.monotonic_ns()}"
    producer = CLIENTS[ingress](address, session, "t", "alice", "bob")
    consumer = CLIENTS[ingress](bob_address, session, "t", "bob")
    try:
        with profile.record(pair, f"{ingress}-{size}", seconds) if profile else _nothing():
            result = measure(producer, consumer, size, seconds, pair.pids)
    finally:
        producer.close()
        consumer.close()
    pair.results.setdefault((ingress, size), []).append(result)


@contextlib.contextmanager
def _nothing():
    yield


class Profiler:
    """py-spy ``record`` on both brokers while a case runs (``--profile DIR``)."""

    def __init__(self, folder: Path, native: bool) -> None:
        self.exe = os.environ.get("PY_SPY") or shutil.which("py-spy")
        if not self.exe:
            raise BenchError("--profile needs py-spy on PATH (or PY_SPY=/path/to/py-spy)")
        self.folder = folder
        self.native = native
        folder.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def record(self, pair: Pair, case: str, seconds: float):
        procs = []
        for party, pid in pair.pids.items():
            name = "-".join(x for x in (pair.name.replace(" ", "-"), case, party) if x)
            cmd = [self.exe, "record", "--pid", str(pid), "--rate", "200", "--format", "raw"]
            cmd += ["--duration", str(max(1, int(seconds))), "-o", str(self.folder / name)]
            cmd += ["--native"] if self.native else []
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        time.sleep(0.5)  # py-spy attaches
        try:
            yield
        finally:
            for proc in procs:
                proc.wait(seconds + 30)


# --------------------------------------------------------------------------------------------
# the ceiling and the client check: servers in a child process (``--serve KIND``)


def _serve_socket(kind: str) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(listener.getsockname()[1], flush=True)
    conn, _ = listener.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if kind == "stream":  # count bytes until EOF, answer the count
        buf, total = bytearray(BIG), 0
        while n := conn.recv_into(buf):
            total += n
        conn.sendall(total.to_bytes(8, "big"))
        return
    buf = bytearray(SMALL)  # ping-pong: each SMALL message is answered with itself
    view = memoryview(buf)
    while True:
        got = 0
        while got < SMALL:
            n = conn.recv_into(view[got:])
            if not n:
                return
            got += n
        conn.sendall(buf)


class _TrivialHttp(asyncio.Protocol):
    """Push stores the body in one queue, pop takes it: no headers read, no forwarding."""

    def __init__(self, queue: deque, waiters: deque) -> None:
        self.queue, self.waiters = queue, waiters
        self.buf = bytearray()
        self.head: tuple[bytes, int] | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(self.buf[:end]).lower()
                del self.buf[: end + 4]
                length = int(head.split(b"content-length:")[1].split(b"\r\n")[0])
                self.head = (head.split(b" ")[1], length)
            path, length = self.head
            if len(self.buf) < length:
                return
            body = bytes(self.buf[:length])
            del self.buf[:length]
            self.head = None
            if b"/push" in path:
                self._answer(b"")
                while self.waiters:
                    waiter = self.waiters.popleft()
                    if not waiter.transport.is_closing():
                        waiter._answer(body)
                        break
                else:
                    self.queue.append(body)
            elif self.queue:
                self._answer(self.queue.popleft())
            else:
                self.waiters.append(self)

    def _answer(self, payload: bytes) -> None:
        body = TransportOutbound(payload=payload, code=codes.OK).SerializeToString()
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        self.transport.writelines([head, body])


def _serve_trivial_http() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def main() -> None:
        queue, waiters = deque(), deque()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _TrivialHttp(queue, waiters), "127.0.0.1", 0)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())


def _serve_trivial_grpc() -> None:
    import queue
    from concurrent import futures

    messages: queue.Queue[bytes] = queue.Queue()
    ok = ptp_pb2.TransportOutbound(code=codes.OK).SerializeToString()

    def push(request, context):
        messages.put(request.payload)
        return ok

    def pop(request, context):  # answered encoded by hand, as the client's push is
        try:
            payload = messages.get(timeout=request.timeout / 1000)
        except queue.Empty:
            return ptp_pb2.TransportOutbound(code=_EMPTY_POP).SerializeToString()
        return b"".join((b"\x12", _varint(len(payload)), payload, ok))

    def unary(fn, request_type):
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=request_type.FromString,
            response_serializer=lambda answer: answer,
        )

    server = grpc.server(
        futures.ThreadPoolExecutor(4),
        options=[("grpc.max_receive_message_length", 1 << 30), ("grpc.so_reuseport", 0)],
    )
    methods = {"push": unary(push, ptp_pb2.PushInbound), "pop": unary(pop, ptp_pb2.PopInbound)}
    handler = grpc.method_handlers_generic_handler("org.ppc.ptp.PrivateTransferTransport", methods)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


SERVERS = {
    "stream": lambda: _serve_socket("stream"),
    "pingpong": lambda: _serve_socket("pingpong"),
    "http": _serve_trivial_http,
    "grpc": _serve_trivial_grpc,
}


@contextlib.contextmanager
def child_server(kind: str):
    """A ``--serve KIND`` child process; yields (its pid, its port)."""
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--serve", kind],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        if not line.strip().isdigit():
            raise BenchError(f"the {kind} server did not start")
        yield proc.pid, int(line)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def loopback_stream(seconds: float) -> float:
    """MB/s of one TCP stream over 127.0.0.1 (1 MB writes, to a reader in another process)."""
    with child_server("stream") as (_, port):
        sock = socket.create_connection(("127.0.0.1", port))
        chunk = memoryview(b"\xa5" * BIG)
        started, sent = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            sock.sendall(chunk)
            sent += BIG
        sock.shutdown(socket.SHUT_WR)
        total = int.from_bytes(sock.recv(8), "big")
        elapsed = time.perf_counter() - started
        sock.close()
    if total != sent:
        raise BenchError(f"loopback stream: {sent} bytes sent, {total} received")
    return sent / elapsed / 1e6


def loopback_pingpong(seconds: float) -> float:
    """Round trips per second of 1 KB, each answered before the next is sent."""
    with child_server("pingpong") as (_, port):
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        message, buf = b"\xa5" * SMALL, bytearray(SMALL)
        view = memoryview(buf)
        started, count = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            sock.sendall(message)
            got = 0
            while got < SMALL:
                got += sock.recv_into(view[got:])
            count += 1
        elapsed = time.perf_counter() - started
        sock.close()
    return count / elapsed


def client_check(ingress: str, seconds: float) -> tuple[Result, Result]:
    """The bench's own clients against a trivial server: (1 MB result, 1 KB result)."""
    with child_server(ingress) as (pid, port):
        results = []
        for size in (BIG, SMALL):
            address = f"127.0.0.1:{port}"
            producer = CLIENTS[ingress](address, "s", "t", "alice", "bob")
            consumer = CLIENTS[ingress](address, "s", "t", "bob")
            try:
                results.append(measure(producer, consumer, size, seconds, {"server": pid}))
            finally:
                producer.close()
                consumer.close()
    return results[0], results[1]


# --------------------------------------------------------------------------------------------
# report


def _cpu(results: list[Result], names: tuple[str, ...]) -> str:
    """Median CPU microseconds per message of each process, ``a/b/c``: unlike throughput,
    little disturbed by other load on the machine."""
    return "/".join(
        f"{statistics.median(r.cpu.get(n, 0) / r.messages * 1e6 for r in results):.0f}"
        for n in names
    )


def _median(results: list[Result], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in results)


def table(pairs: list[Pair], ingresses: list[str], rounds: int) -> list[str]:
    """One row per ingress and pair: medians over the rounds (their range with --rounds)."""
    named = any(p.variant.label for p in pairs)
    width = max([len(p.variant.label) for p in pairs] + [7])

    def lead(text: str) -> str:
        return text.ljust(width) + "  " if named else ""

    lines = [
        lead("variant") + "ingress  mode     MB/s (1 MB)  msgs/s (1 KB)"
        "   CPU us/msg alice/bob/client: 1 MB | 1 KB",
    ]
    parties = ("alice", "bob", "client")
    for ingress in ingresses:
        for p in pairs:
            big, small = p.results.get((ingress, BIG)), p.results.get((ingress, SMALL))
            if not big or not small:
                continue
            row = f"{ingress:<7}  {p.mode:<7}  {_median(big, 'mbps'):11.1f}  "
            row += f"{_median(small, 'msgps'):13.0f}   "
            row += f"{_cpu(big, parties)} | {_cpu(small, parties)}"
            if rounds > 1:
                row += f"   (range {min(r.mbps for r in big):.0f}-{max(r.mbps for r in big):.0f}"
                row += f" MB/s, {min(r.msgps for r in small):.0f}-"
                row += f"{max(r.msgps for r in small):.0f} msgs/s)"
            lines.append(lead(p.variant.label) + row)
    return lines


def targets(pairs: list[Pair]) -> list[str]:
    lines = []
    for p in pairs:
        if p.mode != "durable":
            continue
        for (ingress, size), results in sorted(p.results.items()):
            if size == BIG:
                got, want, unit = _median(results, "mbps"), TARGET_MBPS, "MB/s"
            else:
                got, want, unit = _median(results, "msgps"), TARGET_MSGPS, "msgs/s"
            verdict = "met" if got >= want else "NOT met"
            lines.append(f"target {p.name} {ingress} >= {want} {unit}: {got:.0f}, {verdict}")
    return lines


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Broker pair throughput beside raw loopback.")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    ap.add_argument("--quick", action="store_true", help="1 s each, no client check")
    ap.add_argument("--rounds", type=int, default=1, help="rounds; the table shows medians")
    ap.add_argument("--ingress", default="http,grpc", help="http,grpc (default both)")
    ap.add_argument(
        "--modes",
        default="memory,durable",
        help="memory,durable,fsync (default memory,durable; fsync: durable with "
        "queue.store.fsync = true)",
    )
    ap.add_argument("--forward", default="grpc", help="route alice -> bob: grpc, http or both")
    ap.add_argument("--loops", default="uvloop", help="brokers' event loop: uvloop, asyncio")
    ap.add_argument(
        "--trees",
        default="",
        help="LABEL=DIR,...: broker sources to compare side by side (PYTHONPATH of the "
        "broker processes); default: the installed psi-run",
    )
    ap.add_argument("--no-client-check", action="store_true", help="skip the client check")
    ap.add_argument("--workdir", type=Path, help="brokers' folders and logs here (kept)")
    ap.add_argument("--profile", type=Path, help="record py-spy profiles of the brokers here")
    ap.add_argument("--native", action="store_true", help="with --profile: C frames too")
    ap.add_argument("--serve", choices=sorted(SERVERS), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.no_client_check = 1.0, True
    return args


def variants(args: argparse.Namespace) -> list[Variant]:
    trees: list[tuple[str, Path | None]] = [("", None)]
    if args.trees:
        trees = []
        for item in args.trees.split(","):
            label, _, folder = item.partition("=")
            if not (Path(folder) / "broker" / "cli.py").is_file():
                raise BenchError(f"--trees {item}: no broker/cli.py under {folder}")
            trees.append((label, Path(folder).resolve()))
    loops, forwards = args.loops.split(","), args.forward.split(",")
    out = []
    for label, tree in trees:
        for loop in loops:
            for forward in forwards:
                parts = [label, loop if len(loops) > 1 else "", f"fwd-{forward}"]
                if len(forwards) == 1:
                    parts.pop()
                out.append(Variant(" ".join(x for x in parts if x), tree, loop, forward))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_malloc_thresholds()
    if args.serve:
        SERVERS[args.serve]()
        return 0
    started = time.monotonic()
    ingresses = args.ingress.split(",")
    print(
        f"broker pair, {os.cpu_count()} cores: producer -> alice ({'/'.join(ingresses)} push) -> "
        f"forward ({args.forward}) -> bob -> consumer (pop); {args.seconds:g} s per measurement"
    )
    stream, pingpong = loopback_stream(args.seconds), loopback_pingpong(args.seconds)
    profile = Profiler(args.profile, args.native) if args.profile else None
    pairs: list[Pair] = []
    with contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-"))
        try:
            for n, variant in enumerate(variants(args)):
                for mode in args.modes.split(","):
                    pair = start_pair(Path(tmp) / f"pair{n}-{mode}", variant, mode)
                    pairs.append(pair)
                    print(f"{pair.name or 'brokers'}: {mode} requested, {pair.reported}")
                    if mode != "memory" and pair.reported == "durable: not available":
                        print("  (durable rows skipped: they would repeat the memory rows)")
                        stop_pair(pairs.pop())
            for rnd in range(args.rounds):
                order = pairs if rnd % 2 == 0 else pairs[::-1]  # noise hits every pair alike
                for ingress in ingresses:
                    for size in (BIG, SMALL):
                        for pair in order:
                            run_case(pair, ingress, size, args.seconds, profile)
        finally:
            for pair in pairs:
                stop_pair(pair)
    checks = {}
    if not args.no_client_check:
        checks = {ingress: client_check(ingress, args.seconds) for ingress in ingresses}
    print()
    print("\n".join(table(pairs, ingresses, args.rounds)))
    print(f"loopback ceiling: one TCP stream {stream:.0f} MB/s; 1 KB ping-pong {pingpong:.0f}/s")
    for ingress, (big, small) in checks.items():
        print(
            f"client check ({ingress} client, trivial one-process server): {big.mbps:.0f} MB/s, "
            f"{small.msgps:.0f} msgs/s; CPU us/msg server/client "
            f"{_cpu([big], ('server', 'client'))} | {_cpu([small], ('server', 'client'))}"
        )
    print("\n".join(targets(pairs)))
    print(f"({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        print(f"bench_broker: {exc}", file=sys.stderr)
        sys.exit(1)
