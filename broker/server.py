"""The broker process: listeners, background tasks and an orderly lifecycle.

``Broker.start()`` binds every configured listener (port 0 picks a free port; the real bound
addresses are in ``Broker.addresses``), ``serve()`` runs until ``stop()`` is called, and
``stop()`` stops accepting, lets in-flight requests finish within a bounded wait, then closes.
"""

from __future__ import annotations

import asyncio
import enum
import logging

import grpc
from aiohttp import web

from . import tls
from .config import BrokerConfig
from .dispatch import Dispatcher
from .errors import BrokerError
from .grpc_api import add_services, server_options
from .http_api import HttpApi
from .memory import raise_malloc_thresholds, release_free_memory
from .refusals import LibraryLogFilter, RefusalLog
from .routes import RouteTableFile

log = logging.getLogger("broker.server")

GRACE_S = 5.0
_CANCEL_MARGIN_S = 1.0
# Where grpc's Cython layer logs requests it could not take (metadata that is not UTF-8).
_GRPC_LOGGER = "grpc._cython.cygrpc"


class State(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Broker:
    """One psi-broker: HTTP/HTTPS and gRPC/gRPC-TLS front ends over one Dispatcher."""

    def __init__(self, cfg: BrokerConfig) -> None:
        self.cfg = cfg
        self.routes = RouteTableFile(cfg.route_table_path)
        self.dispatcher = Dispatcher(cfg, self.routes)
        self.state = State.NEW
        self.addresses: dict[str, str] = {}
        self._runners: list[web.AppRunner] = []
        self._sites: list[web.TCPSite] = []
        self._grpc: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self.refusals = RefusalLog()
        self._grpc_filter = LibraryLogFilter(self.refusals, "grpc request")

    async def start(self) -> None:
        cfg = self.cfg
        host = cfg.bind_host
        # Messages accepted before a restart are queued again before any port opens.
        self.dispatcher.open_store()
        tls_host = cfg.tls_bind_host or host  # tls.bind.host: only the TLS ports face outside
        logging.getLogger(_GRPC_LOGGER).addFilter(self._grpc_filter)
        server = grpc.aio.server(options=server_options(self.dispatcher))
        add_services(server, self.dispatcher, refusals=self.refusals)
        port = _bind(server.add_insecure_port, host, cfg.grpc_port, "grpc.port")
        self.addresses["grpc"] = f"{host}:{port}"
        if cfg.open_grpc_tls_server:
            creds = tls.grpc_server_credentials(cfg)
            port = _bind(
                lambda a: server.add_secure_port(a, creds),
                tls_host,
                cfg.grpc_tls_port,
                "grpc.tls.port",
            )
            self.addresses["grpcs"] = f"{tls_host}:{port}"
        await server.start()
        self._grpc = server

        if cfg.open_http_server:
            self.addresses["http"] = await self._start_http(host, cfg.http_port or 0, None)
        if cfg.open_https_server:
            self.addresses["https"] = await self._start_http(
                tls_host, cfg.https_port or 0, tls.https_context(cfg)
            )
        d = self.dispatcher
        self._tasks = [
            asyncio.create_task(self._every(cfg.route_reload_interval_ms, d.reload_routes)),
            asyncio.create_task(self._every(cfg.queue_check_interval_ms, d.expire_queues)),
            asyncio.create_task(self._every(1000, self.refusals.flush)),
        ]
        if cfg.memory_trim_interval_ms:
            raise_malloc_thresholds()  # the heap is given back by the trim, not each free
            trim = self._every(cfg.memory_trim_interval_ms, release_free_memory)
            self._tasks.append(asyncio.create_task(trim))
        self.state = State.RUNNING
        for name, addr in self.addresses.items():
            log.info("listening: %s on %s", name, addr)

    async def _start_http(self, host: str, port: int, ssl_ctx) -> str:
        protocol = "https" if ssl_ctx else "http"
        app = HttpApi(self.dispatcher, protocol, self.refusals).app()
        # aiohttp logs each request it cannot parse with a traceback at ERROR; this logger
        # makes each one a short, rate-limited refusal line instead.
        server_log = logging.getLogger(f"broker.{protocol}.server")
        for old in list(server_log.filters):  # a broker started earlier in this process
            server_log.removeFilter(old)
        server_log.addFilter(LibraryLogFilter(self.refusals, f"{protocol} request"))
        # aiohttp reports a request that is not HTTP at all (random bytes, a TLS hello on the
        # plain port) only at DEBUG; the filter turns it into one rate-limited refusal line
        # and drops aiohttp's other DEBUG records.
        server_log.setLevel(logging.DEBUG)
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=GRACE_S,
            logger=server_log,
            # A pop whose client hung up ends at once (its message, if any, stays queued)
            # instead of holding memory until its timeout.
            handler_cancellation=True,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx, backlog=1024)
        await site.start()
        self._runners.append(runner)
        self._sites.append(site)
        sock = site._server.sockets[0].getsockname()  # type: ignore[union-attr]
        return f"{host}:{sock[1]}"

    @staticmethod
    async def _every(interval_ms: int, fn) -> None:
        while True:
            await asyncio.sleep(interval_ms / 1000)
            try:
                fn()
            except Exception:
                log.exception("background task %s failed", getattr(fn, "__name__", fn))

    async def serve(self) -> None:
        """Run until stop() has finished."""
        await self._stopped.wait()

    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests (bounded), release everything. Idempotent.

        The uvicorn order: every listener (HTTP, HTTPS, gRPC, gRPC-TLS) closes first, so no
        port takes a new request while in-flight ones finish; then one grace period covers the
        in-flight work of all front ends; what is still running after it is cancelled.
        """
        if self.state in (State.STOPPING, State.STOPPED):
            await self._stopped.wait()
            return
        self.state = State.STOPPING
        log.info("stopping: no new requests, waiting up to %.0f s for in-flight ones", GRACE_S)
        try:
            for task in self._tasks:
                task.cancel()
            for site in self._sites:
                await site.stop()  # closes the listening socket; open connections stay
            # gRPC refuses new calls once stop() runs and cancels the calls left after the grace.
            draining = [asyncio.ensure_future(self._grpc.stop(GRACE_S))] if self._grpc else []
            self.dispatcher.queues.close()  # long-polling pops answer "no message" now
            # A runner waits up to its shutdown_timeout (GRACE_S) for handlers, then cancels them.
            draining += [asyncio.ensure_future(runner.cleanup()) for runner in self._runners]
            # Messages accepted for other brokers get the same grace to be sent on.
            draining.append(asyncio.ensure_future(self.dispatcher.outbox.close(GRACE_S)))
            await self._drain(draining)
            await self.dispatcher.forwarder.close()
        finally:
            self.dispatcher.close_store()
            self.refusals.flush(final=True)
            logging.getLogger(_GRPC_LOGGER).removeFilter(self._grpc_filter)
            # Set even if a front end failed to drain: serve() must return so the process exits.
            self.state = State.STOPPED
            log.info("stopped")
            self._stopped.set()

    @staticmethod
    async def _drain(tasks: list[asyncio.Future[None]]) -> None:
        """Wait for the front ends' own graceful stops; cancel what overruns the grace."""
        if not tasks:
            return
        # The front ends cancel their own calls at GRACE_S; the margin is for that to settle.
        done, pending = await asyncio.wait(tasks, timeout=GRACE_S + _CANCEL_MARGIN_S)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "%d front end(s) still busy after the grace period; cancelled", len(pending)
            )
            await asyncio.wait(pending, timeout=_CANCEL_MARGIN_S)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("a front end failed to stop cleanly", exc_info=task.exception())


def _bind(add_port, host: str, port: int | None, key: str) -> int:
    try:
        bound = add_port(f"{_bracket(host)}:{port or 0}")
    except RuntimeError as exc:  # grpc reports a failed bind this way
        raise BrokerError(f"{key}: cannot listen on {host}:{port} ({exc}); is it in use?") from None
    if not bound:
        raise BrokerError(f"{key}: cannot listen on {host}:{port}; is the port already in use?")
    return bound


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
