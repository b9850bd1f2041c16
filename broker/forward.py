"""Sending messages on to the next broker: OSX gRPC ``invoke`` or HTTP ``.../invoke``, or
several in one call (:mod:`broker.batch`) when the next hop is a psi-broker that takes them.

Clients are made once per route and kept (connections are reused). A next hop that cannot be
reached is retried, trying every route listed for the party, until ``forward.retry.timeout``
has passed; only then is the caller (the outbox) told that the peer is unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from dataclasses import replace

import aiohttp
import grpc

from . import batch, codes, reach, wire
from .envelope import Envelope
from .proto import http_ptp_pb2, ptp_pb2
from .refusals import short
from .routes import Route

log = logging.getLogger("broker.forward")
_INVOKE = "/org.ppc.ptp.PrivateTransferProtocol/invoke"


class _Unreachable(Exception):
    """The next hop did not answer at all (connection refused, reset, timeout); ``why`` says
    it in a few words (:func:`broker.reach.reason`)."""

    def __init__(self, detail: str, why: str) -> None:
        super().__init__(detail)
        self.why = why


class _BadRoute(Exception):
    """The route's TLS settings cannot work; the sender is told at once, no retries."""


class _Stale(Exception):
    """The route's client was closed while a message was on its way; a new one is made."""


def _check_client_tls(route: Route, key_in_cert_ok: bool = False) -> None:
    """Read the route's PEM files with Python's ssl, naming the file that is wrong.

    gRPC's C core aborts the whole broker on a certificate without its key (or an empty key
    file) and reports an unreadable key only as an unreachable peer. For HTTP routes the key
    may sit in the certChainFile (``key_in_cert_ok``), as Python's ssl allows.
    """
    if route.private_key_file and not route.cert_chain_file:
        raise _BadRoute("privateKeyFile needs certChainFile (the client certificate)")
    if route.cert_chain_file and not route.private_key_file and not key_in_cert_ok:
        raise _BadRoute("certChainFile needs privateKeyFile (the client certificate's key)")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if route.ca_file:
        try:
            ctx.load_verify_locations(cafile=route.ca_file)
        except ssl.SSLError as exc:
            raise _BadRoute(f"caFile {route.ca_file}: no usable PEM certificate ({exc})") from None
    if route.cert_chain_file:
        try:
            ctx.load_cert_chain(route.cert_chain_file, route.private_key_file)
        except ssl.SSLError as exc:
            key = route.private_key_file or "(none: expected in the certChainFile)"
            raise _BadRoute(
                f"certChainFile {route.cert_chain_file}, privateKeyFile {key}: "
                f"not a PEM certificate and its matching key ({exc})"
            ) from None


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fh:
        return fh.read()


def _unreachable_grpc(exc: grpc.aio.AioRpcError) -> _Unreachable:
    detail = exc.details() or exc.code().name
    return _Unreachable(detail, reach.reason(detail))


def _batch_answer(body: bytes, sent: int) -> list[tuple[str, str]]:
    try:
        answers = batch.decode_answer(body)
    except ValueError as exc:
        return [(codes.INTERNAL, f"unreadable batch answer ({exc})")]
    if not answers or len(answers) > sent:
        return [(codes.INTERNAL, f"batch answer with {len(answers)} answers to {sent} messages")]
    return answers


class _GrpcHop:
    def __init__(self, route: Route, max_message: int, window: int) -> None:
        options = [
            ("grpc.max_send_message_length", max_message),
            ("grpc.max_receive_message_length", max_message),
            ("grpc.http2.lookahead_bytes", window),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.enable_http_proxy", 0),  # peers are reached directly, never via http_proxy
        ]
        self.target = target = f"{route.ip}:{route.port}"
        if route.use_ssl:
            _check_client_tls(route)
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(route.ca_file),
                private_key=_read(route.private_key_file),
                certificate_chain=_read(route.cert_chain_file),
            )
            self.channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        # PrivateTransferProtocol.invoke taking the request already encoded (wire.inbound).
        self.invoke = self.channel.unary_unary(
            _INVOKE, request_serializer=None, response_deserializer=ptp_pb2.Outbound.FromString
        )
        self.invoke_batch = self.channel.unary_unary(
            batch.GRPC_METHOD, request_serializer=None, response_deserializer=None
        )
        self.batches = True  # until the peer says it does not know the method

    async def send_batch(self, items: list[tuple[Envelope, bytes]], timeout: float):
        """Answers to ``items`` sent in one call (see broker.batch); None when the peer
        does not take batches (then it is asked no more)."""
        body = batch.encode_request([(env.headers(), payload) for env, payload in items])
        try:
            reply = await self.invoke_batch(body, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.batches = False
                log.info(
                    "%s does not take batches (UNIMPLEMENTED); one message per call", self.target
                )
                return None
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _unreachable_grpc(exc) from None
            return [(codes.INTERNAL, f"gRPC {exc.code().name}: {exc.details()}")]
        except grpc.aio.UsageError as exc:
            raise _Stale(str(exc)) from None
        return _batch_answer(reply, len(items))

    async def send(self, env: Envelope, payload: bytes, timeout: float) -> tuple[str, str]:
        headers = env.headers()
        try:
            reply = await self.invoke(
                wire.inbound(headers, payload),
                metadata=tuple(headers.items()),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise _unreachable_grpc(exc) from None
            return codes.INTERNAL, f"gRPC {exc.code().name}: {exc.details()}"
        except grpc.aio.UsageError as exc:  # the channel was closed under us (stop, route edit)
            raise _Stale(str(exc)) from None
        return reply.code or codes.OK, reply.message

    async def close(self) -> None:
        await self.channel.close()


class _HttpHop:
    def __init__(self, route: Route) -> None:
        self.url = route.url or ""
        ssl_ctx: ssl.SSLContext | bool = False
        if route.use_ssl:
            _check_client_tls(route, key_in_cert_ok=True)
            ssl_ctx = ssl.create_default_context(cafile=route.ca_file)
            if route.cert_chain_file:
                ssl_ctx.load_cert_chain(route.cert_chain_file, route.private_key_file)
        self._ssl = ssl_ctx
        self._session: aiohttp.ClientSession | None = None
        # Batches go to .../invoke-batch beside a route's .../invoke.
        self.batches = self.url.rstrip("/").endswith("/invoke")
        self.batch_url = self.url.rstrip("/") + batch.HTTP_SUFFIX

    async def _post(
        self, url: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> tuple[int, bytes]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=64),
                skip_auto_headers=("User-Agent",),
            )
        async with self._session.post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as resp:
            return resp.status, await resp.read()

    async def send_batch(self, items: list[tuple[Envelope, bytes]], timeout: float):
        """Answers to ``items`` sent in one call (see broker.batch); None when the peer
        does not take batches (then it is asked no more)."""
        body = batch.encode_request([(env.headers(), payload) for env, payload in items])
        try:
            status, answer = await self._post(self.batch_url, body, {}, timeout)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise _Unreachable(str(exc) or type(exc).__name__, reach.reason(exc)) from None
        except aiohttp.ClientResponseError as exc:  # it answered, but not in HTTP
            return [(codes.INTERNAL, f"{self.url} did not answer in HTTP ({short(exc.message)})")]
        except RuntimeError as exc:
            if self._session is not None and self._session.closed:
                raise _Stale(str(exc)) from None
            raise
        if status in (404, 405):
            self.batches = False
            log.info("%s does not take batches (HTTP %d); one message per call", self.url, status)
            return None
        if status != 200:
            return [(codes.INTERNAL, f"HTTP {status} from {self.batch_url}")]
        try:
            batch.decode_answer(answer)
        except ValueError:  # a server that answers every path in its own way: not a psi-broker
            log.warning("%s does not take batches; sending one message per call", self.url)
            self.batches = False
            return None
        return _batch_answer(answer, len(items))

    async def send(self, env: Envelope, payload: bytes, timeout: float) -> tuple[str, str]:
        try:
            status, body = await self._post(self.url, payload, env.headers(), timeout)
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            raise _Unreachable(str(exc) or type(exc).__name__, reach.reason(exc)) from None
        except aiohttp.ClientResponseError as exc:  # it answered, but not in HTTP
            return codes.INTERNAL, f"{self.url} did not answer in HTTP ({short(exc.message)})"
        except RuntimeError as exc:
            if self._session is not None and self._session.closed:  # closed under us
                raise _Stale(str(exc)) from None
            raise
        if status != 200:
            return codes.INTERNAL, f"HTTP {status} from {self.url}"
        reply = http_ptp_pb2.TransportOutbound()
        try:
            reply.ParseFromString(body)
        except Exception:  # noqa: BLE001 - any decode failure means a foreign answer
            return codes.INTERNAL, f"unreadable answer from {self.url}"
        return reply.code or codes.OK, reply.message

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class Forwarder:
    """Delivers messages to next-hop brokers, one reusable client per route."""

    def __init__(
        self,
        retry_timeout_s: float,
        call_timeout_s: float = 600.0,
        max_message: int = 2**31 - 1,
        window: int = 134217728,
    ) -> None:
        self.retry_timeout_s = retry_timeout_s
        self.call_timeout_s = call_timeout_s
        self._max_message = max_message
        self._window = window
        self._hops: dict[Route, _GrpcHop | _HttpHop] = {}
        self.reach = reach.Reachability()  # next hops that do not answer now (/health)
        # Clients of routes an edit replaced: closed once their in-flight calls can be done.
        self._retiring: dict[asyncio.Task, _GrpcHop | _HttpHop] = {}

    def _hop(self, route: Route) -> _GrpcHop | _HttpHop:
        hop = self._hops.get(route)
        if hop is None:
            if route.protocol == "http":
                hop = _HttpHop(route)
            else:
                hop = _GrpcHop(route, self._max_message, self._window)
            self._hops[route] = hop
        return hop

    def check(self, routes: tuple[Route, ...]) -> str:
        """Why a message for ``routes`` cannot be sent at all (a route's TLS files are
        unusable), or "" when it can: said to the sender at once, before anything is queued."""
        for route in routes:
            try:
                self._hop(route)
            except (OSError, _BadRoute) as exc:
                return f"{route.target}: {exc}"
        return ""

    async def send(
        self, routes: tuple[Route, ...], env: Envelope, payload: bytes
    ) -> tuple[str, str, Route | None]:
        """Send to the first route that answers; return (code, message, route used)."""
        answers, route = await self.send_batch(routes, [(env, payload)])
        return answers[0][0], answers[0][1], route

    async def send_batch(
        self, routes: tuple[Route, ...], items: list[tuple[Envelope, bytes]]
    ) -> tuple[list[tuple[str, str]], Route | None]:
        """Send ``items`` (one next hop's, in order) to the first route that answers, in one
        call when the peer takes batches; return the answers to the first items (at least
        one; the rest were not taken and are to be sent again) and the route used. Every item
        shares one envelope's target. While no route answers, ``reach`` says so."""
        party = items[0][0].target_node
        deadline = time.monotonic() + self.retry_timeout_s
        delay = 0.1
        last_error = ""
        retrying = False
        try:
            while True:
                for route in routes:
                    try:
                        answers = await self._call(route, items)
                    except _Unreachable as exc:
                        last_error = f"{route.target}: {exc}"
                        self.reach.failed(party, route, exc.why)
                        continue
                    except _Stale as exc:
                        last_error = f"{route.target}: {exc}"
                        continue
                    self.reach.answered(party)
                    return answers, route
                if time.monotonic() + delay > deadline:
                    return [
                        (
                            codes.PEER_UNREACHABLE,
                            f"no answer from the broker of {party} ({last_error})",
                        )
                    ], None
                if not retrying:
                    retrying = True
                    self.reach.retrying(party)
                log.warning("next hop for %s unreachable, retrying: %s", party, last_error)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        finally:
            if retrying:
                self.reach.settled(party)

    async def _call(
        self, route: Route, items: list[tuple[Envelope, bytes]]
    ) -> list[tuple[str, str]]:
        """One call on ``route``: the answers (see send_batch). Raise _Unreachable or _Stale
        when it is to be tried again; anything else is an answer with a PTP code."""
        hop = None
        try:
            hop = self._hop(route)
            sent = items
            if route.token:
                sent = [(replace(e, token=route.token), p) for e, p in items]
            answers = None
            if len(sent) > 1 and hop.batches:
                answers = await hop.send_batch(sent, self.call_timeout_s)
            if answers is None:
                answers = [await hop.send(*sent[0], self.call_timeout_s)]
            return answers
        except _Unreachable:
            raise
        except _Stale:
            if hop is not None and self._hops.get(route) is hop:
                del self._hops[route]
            raise
        except (OSError, _BadRoute) as exc:  # e.g. a TLS file that went missing
            return [(codes.INTERNAL, f"{route.target}: {exc}")]
        except Exception as exc:  # noqa: BLE001 - the sender gets a code, not our crash
            # A call that could not even start (its client refused the message).
            log.warning("sending to %s failed: %s", route.target, short(repr(exc)))
            return [(codes.INTERNAL, f"{route.target}: could not send ({short(str(exc))})")]

    async def prune(self, keep: set[Route]) -> None:
        """Retire clients of routes that are no longer in the table.

        New messages get a new client at once; the old one is closed only after the longest
        call it may be carrying (closing it at once would cut a push in flight, and its
        sender would see the connection drop without an answer)."""
        loop = asyncio.get_running_loop()
        for route in [r for r in self._hops if r not in keep]:
            hop = self._hops.pop(route)
            task = loop.create_task(self._retire(hop, self.call_timeout_s + 1.0))
            self._retiring[task] = hop
            task.add_done_callback(lambda t: self._retiring.pop(t, None))

    @staticmethod
    async def _retire(hop: _GrpcHop | _HttpHop, after_s: float) -> None:
        await asyncio.sleep(after_s)
        await hop.close()

    async def close(self) -> None:
        for task, hop in list(self._retiring.items()):
            task.cancel()
            await hop.close()
        self._retiring.clear()
        for route in list(self._hops):
            await self._hops.pop(route).close()
