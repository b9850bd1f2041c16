"""PTP over HTTP/1.1: the queue API that SPU's yacl blackbox link speaks.

Under ``http.context.path`` (default ``/v1``)::

    POST /interconn/chan/push       store for / send to x-ptp-target-node-id
    POST /interconn/chan/pop?timeout=N    long-poll the caller's queue (N seconds)
    POST /interconn/chan/peek       look at the next message without consuming it
    POST /interconn/chan/release    drop the session's queues (x-ptp-topic narrows it)
    POST /interconn/chan/invoke     a message from another broker

Every answer is HTTP 200 with a protobuf ``TransportOutbound {payload=1, code=2, message=3}``,
refusals included: headers and the pop timeout are parsed from the raw request by the rules of
:mod:`broker.edge`, and a value that breaks them is answered with its PTP code. A pop that
finds nothing in time is ``E0000000601`` with an empty payload, as OSX answers it (SPU's link
pops again on any answer without a payload). Outside the context path: ``GET /health`` and
``GET /metrics`` (Prometheus text).
"""

from __future__ import annotations

import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from . import batch, codes, edge, wire
from .dispatch import Dispatcher
from .envelope import Envelope
from .metrics import render_metrics
from .proto.http_ptp_pb2 import TransportOutbound
from .queues import QueueKey
from .refusals import RefusalLog

log = logging.getLogger("broker.http")
_CONTENT_TYPE = "application/x-protobuf"
_ANSWER_MARGIN_S = 0.25
_LATE_S = 0.5
_JOIN_MAX = 1 << 16  # a popped payload up to this size is sent in one piece with its headers


def _answer(code: str, message: str = "", payload: bytes = b"") -> web.Response:
    body = TransportOutbound(payload=payload, code=code, message=message).SerializeToString()
    return web.Response(body=body, content_type=_CONTENT_TYPE)


class _PopAnswer(web.StreamResponse):
    # Headers go out with the first body bytes (one write instead of two). aiohttp >= 3.12
    # reads this attribute; older versions send the headers at once, which is only slower.
    _send_headers_immediately = False


def _peer(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else ""


def _envelope(request: web.Request) -> Envelope:
    # The raw bytes, not aiohttp's decoded copy (which keeps bad UTF-8 as lone surrogates).
    return Envelope.parse(request.raw_headers)


class HttpApi:
    """aiohttp handlers bound to one Dispatcher."""

    def __init__(
        self, dispatcher: Dispatcher, protocol: str = "http", refusals: RefusalLog | None = None
    ) -> None:
        self.d = dispatcher
        self.protocol = protocol
        self.refusals = refusals or RefusalLog()

    def app(self) -> web.Application:
        cfg = self.d.cfg
        app = web.Application(client_max_size=cfg.message_max_size + 1024, middlewares=[self._edge])
        base = cfg.http_context_path + "/interconn/chan/"
        app.router.add_post(base + "push", self.push)
        app.router.add_post(base + "pop", self.pop)
        app.router.add_post(base + "peek", self.peek)
        app.router.add_post(base + "release", self.release)
        app.router.add_post(base + "invoke", self.invoke)
        if cfg.invoke_batch_enabled:
            app.router.add_post(base + "invoke" + batch.HTTP_SUFFIX, self.invoke_batch)
        app.router.add_get(base + "traffic", self.traffic)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        return app

    @web.middleware
    async def _edge(self, request: web.Request, handler) -> web.StreamResponse:
        """Every refusal becomes a PTP answer and one rate-limited line in broker.log and in
        flow.log; a bug, a PTP 500."""
        try:
            return await handler(request)
        except edge.Refusal as exc:
            op = request.path.rsplit("/", 1)[-1]
            self.refusals.refused(self.protocol, op, _peer(request), exc)
            self.d.counters[f"errors|{exc.code}"] += 1
            return _answer(exc.code, exc.reason)
        except web.HTTPException:
            raise  # aiohttp's own answers: 404 and 405 for paths and methods not served
        except ConnectionError:
            # The client left; there is nobody to answer and nothing is wrong with the broker.
            log.debug("client %s left before its %s was answered", _peer(request), request.path)
            raise
        except Exception:
            log.exception("%s %s failed", self.protocol, request.path)
            return _answer(codes.INTERNAL, codes.DESCRIPTIONS[codes.INTERNAL])

    async def _body(self, request: web.Request, limit: int = 0) -> bytes:
        """The body, joined once from the chunks as they come (``request.read()`` copies them
        into a bytearray and that into bytes), refused past ``limit`` (``client_max_size``
        unless given) as aiohttp would refuse it."""
        content, limit = request.content, limit or request.client_max_size
        if hasattr(content, "set_read_chunk_size"):  # aiohttp >= 3.14: buffer whole bodies
            content.set_read_chunk_size(limit)
        chunks, size = [], 0
        try:
            while chunk := await content.readany():
                size += len(chunk)
                if size > limit:
                    max_size = self.d.cfg.message_max_size
                    raise edge.Refusal(
                        f"message is over message.max.size ({max_size} bytes)", codes.TOO_LARGE
                    )
                chunks.append(chunk)
        except HttpProcessingError as exc:  # a body that breaks its own framing
            raise edge.Refusal(f"malformed body: {exc.message}") from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _deliver(self, request: web.Request, from_network: bool) -> web.Response:
        env = _envelope(request)
        code, message = await self.d.deliver(
            env,
            await self._body(request),
            protocol=self.protocol,
            peer_addr=_peer(request),
            from_network=from_network,
        )
        return _answer(code, message)

    async def push(self, request: web.Request) -> web.Response:
        return await self._deliver(request, from_network=False)

    async def invoke(self, request: web.Request) -> web.Response:
        return await self._deliver(request, from_network=True)

    async def invoke_batch(self, request: web.Request) -> web.Response:
        """Several messages from another broker in one request (see broker.batch)."""
        limit = request.client_max_size + batch.MAX_BYTES + (1 << 20)
        body = await self.d.deliver_batch(
            await self._body(request, limit), protocol=self.protocol, peer_addr=_peer(request)
        )
        return web.Response(body=body, content_type=_CONTENT_TYPE)

    async def pop(self, request: web.Request) -> web.StreamResponse:
        key = self.d.queue_key(_envelope(request))
        timeout = self._timeout(request)
        started = time.monotonic()
        # Answer a little before the client's own deadline: SPU's link gives a pop of N s only
        # N + 1 s, and a message answered after the client gave up would be lost.
        wait = timeout - _ANSWER_MARGIN_S if timeout > 2 * _ANSWER_MARGIN_S else timeout
        message = await self.d.pop(key, wait, protocol=self.protocol)
        if message is None:
            return _answer(codes.POP_TIMEOUT, codes.DESCRIPTIONS[codes.POP_TIMEOUT])
        if time.monotonic() - started > timeout + _LATE_S:
            self.d.queues.requeue(key, message)  # the consumer has most likely given up
            log.warning("pop of %s answered late; message kept for the next pop", key.topic)
            return _answer(codes.POP_TIMEOUT, codes.DESCRIPTIONS[codes.POP_TIMEOUT])
        return await self._hand_over(request, key, message)

    async def _hand_over(self, request: web.Request, key: QueueKey, message) -> web.StreamResponse:
        """Answer a pop; a consumer that gave up meanwhile does not lose the message.

        The answer is ``TransportOutbound(payload, code)``; the payload is not copied into it
        but sent as it is between the encoded bytes before and after it (wire.http_answer)."""
        payload = message.payload
        prefix, tail = wire.http_answer(codes.OK, "", payload)
        transport = request.transport
        if transport is None or transport.is_closing():
            self.d.queues.requeue(key, message)
            log.warning("consumer of %s left before its pop was answered; message kept", key.topic)
            raise web.HTTPRequestTimeout()
        resp = _PopAnswer(headers={"Content-Type": _CONTENT_TYPE})
        resp.content_length = len(prefix) + len(payload) + len(tail)
        parts = (prefix, payload, tail) if len(payload) > _JOIN_MAX else (prefix + payload + tail,)
        try:
            await resp.prepare(request)
            for part in parts:
                await resp.write(part)
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            self.d.queues.requeue(key, message)
            log.warning("consumer of %s left while its pop was answered; message kept", key.topic)
        return resp

    def _timeout(self, request: web.Request) -> float:
        values = request.rel_url.query.getall("timeout", [])
        if len(values) > 1:
            raise edge.Refusal("pop timeout is given more than once")
        default_s = self.d.cfg.consume_msg_waiting_timeout_ms / 1000
        return edge.pop_timeout(values[0] if values else "", default_s)

    async def peek(self, request: web.Request) -> web.Response:
        code, text, message = self.d.peek(_envelope(request), protocol=self.protocol)
        return _answer(code, text, message.payload if message else b"")

    async def release(self, request: web.Request) -> web.Response:
        return _answer(*self.d.release(_envelope(request), protocol=self.protocol))

    async def traffic(self, request: web.Request) -> web.Response:
        """psi-run's addition: payload bytes carried on one session so far (both ways), and
        the pops asked on it since the broker started."""
        session = edge.name("session", request.query.get("session", ""))
        bytes_, pops = self.d.session_bytes.get(session, 0), self.d.session_pops.get(session, 0)
        return web.json_response({"session": session, "bytes": bytes_, "pops": pops})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "ok",
                "self_party": sorted(self.d.self_parties),
                "routes": sorted(self.d.routes.table.routes),
                "queues": len(self.d.queues),
                # parties whose next hop does not answer while messages for them wait
                "unreachable": self.d.forwarder.reach.snapshot(),
            }
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=render_metrics(self.d), content_type="text/plain")
