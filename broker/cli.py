"""``psi-broker --conf-dir DIR``: run one party's broker.

Reads ``DIR/broker.properties`` and ``DIR/route_table.json``; logs to ``logs/broker/``
(``broker.log``, ``broker-error.log``, ``flow.log``). When it is listening it prints one JSON
line on stdout with the bound addresses (useful with port 0). SIGTERM or SIGINT stops it
gracefully; a second signal exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path

from . import flowlog
from .config import BrokerConfig, load_config, with_overrides
from .errors import BrokerError

log = logging.getLogger("broker.cli")


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="psi-broker",
        description="OSX-style PTP broker for psi-run (HTTP and gRPC queue API, routing, relay).",
    )
    parser.add_argument(
        "--conf-dir", required=True, help="folder with broker.properties and route_table.json"
    )
    parser.add_argument("--log-dir", help="log folder (default: log.dir, else ./logs/broker)")
    parser.add_argument(
        "--ready-file", help="write the bound addresses as JSON to this file once listening"
    )
    parser.add_argument("--quiet", action="store_true", help="do not copy log lines to stderr")
    return parser.parse_args(argv)


def setup_logging(log_dir: Path, quiet: bool) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    main = logging.FileHandler(log_dir / "broker.log", encoding="utf-8")
    main.setFormatter(fmt)
    errors = logging.FileHandler(log_dir / "broker-error.log", encoding="utf-8")
    errors.setLevel(logging.ERROR)
    errors.setFormatter(fmt)
    root.addHandler(main)
    root.addHandler(errors)
    if not quiet:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(fmt)
        root.addHandler(console)
    flow = logging.getLogger("broker.flow")
    flow.propagate = False
    flow.setLevel(logging.INFO)
    flowlog.write_to(log_dir / "flow.log")


def _log_dir(args: argparse.Namespace, cfg: BrokerConfig) -> Path:
    if args.log_dir:
        return Path(args.log_dir).expanduser().resolve()
    if cfg.log_dir:
        return cfg.resolve(cfg.log_dir).resolve()
    return Path("logs/broker").resolve()


async def _run(cfg: BrokerConfig, ready_file: str | None) -> None:
    from .server import Broker  # imported late: grpc/aiohttp start-up only when running

    broker = Broker(cfg)
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Task[None]] = []  # held: the loop keeps only weak task references

    def on_signal(signum: int) -> None:
        if stopping:
            log.warning("second signal: exiting now")
            os._exit(130)
        log.info("received %s", signal.Signals(signum).name)
        stopping.append(loop.create_task(broker.stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    await broker.start()
    table = broker.routes.table
    log.info("self party %s; routes for %s", sorted(table.self_parties), sorted(table.routes))
    for warning in table.warnings:
        log.warning("route table: %s", warning)
    ready = {"event": "listening", "self_party": sorted(table.self_parties), **broker.addresses}
    if ready_file:
        tmp = Path(ready_file + ".tmp")
        tmp.write_text(json.dumps(ready), encoding="utf-8")
        tmp.replace(ready_file)
    print(json.dumps(ready), flush=True)
    await broker.serve()


def _fail(line: str) -> int:
    print(line, file=sys.stderr, flush=True)
    log.error("%s", line)
    logging.shutdown()
    # A half-started gRPC server can keep threads alive at exit; nothing is left to clean up.
    os._exit(2)


def _install_fast_loop() -> None:
    # uvloop roughly halves the broker's CPU per message; the PSI runs on the same cores.
    if os.environ.get("PSI_BROKER_LOOP", "uvloop") != "uvloop":
        return
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # gRPC's C core would print its own copy of bind errors; ours is the one line that counts.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    try:
        cfg = load_config(args.conf_dir)
        if args.log_dir:
            cfg = with_overrides(cfg, log_dir=str(Path(args.log_dir).resolve()))
        setup_logging(_log_dir(args, cfg), args.quiet)
        if cfg.ignored_keys:
            log.info(
                "broker.properties: keys without effect in psi-broker, ignored: %s",
                ", ".join(cfg.ignored_keys),
            )
        if cfg.unknown_keys:
            log.warning(
                "broker.properties: unknown keys, ignored (check the spelling): %s",
                ", ".join(cfg.unknown_keys),
            )
        if not cfg.open_http_server and not cfg.open_https_server:
            log.warning(
                "open.http.server is false: psi-run and SPU need the HTTP port; "
                "set open.http.server = true and http.port"
            )
        _install_fast_loop()
        asyncio.run(_run(cfg, args.ready_file))
    except BrokerError as exc:
        return _fail(f"psi-broker: {exc}")
    except OSError as exc:
        return _fail(f"psi-broker: cannot start: {exc} (is the port already in use?)")
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
