"""broker.properties: the OSX-style configuration file of ``psi-broker``.

The file uses Java properties syntax (``key = value``, ``#``/``!`` comments). Key names and
defaults follow OSX; keys that only make sense for OSX's Java runtime (eggroll, JKS keystores)
are accepted and reported as ignored; unknown keys draw a warning that names them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

PROPERTIES_FILE = "broker.properties"
ROUTE_TABLE_FILE = "route_table.json"


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _int(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port from 0 to 65535, got {value}")
    return value


def _positive(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise ValueError(f"expected a positive whole number, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise ValueError(f"expected a whole number >= 0, got {value}")
    return value


def _context_path(text: str) -> str:
    path = "/" + text.strip().strip("/")
    return "" if path == "/" else path


# property name -> (field name, converter). Field defaults live on BrokerConfig.
_KEYS: dict[str, tuple[str, object]] = {
    "grpc.port": ("grpc_port", _port),
    "bind.host": ("bind_host", str.strip),
    "tls.bind.host": ("tls_bind_host", str.strip),  # psi-run addition
    "open.grpc.tls.server": ("open_grpc_tls_server", _bool),
    "grpc.tls.port": ("grpc_tls_port", _port),
    "open.http.server": ("open_http_server", _bool),
    "http.port": ("http_port", _port),
    "open.https.server": ("open_https_server", _bool),
    "https.port": ("https_port", _port),
    "http.context.path": ("http_context_path", _context_path),
    "grpc.server.max.concurrent.call.per.connection": ("grpc_max_concurrent_calls", _positive),
    "grpc.server.max.inbound.message.size": ("grpc_server_max_message_size", _positive),
    "grpc.server.max.inbound.metadata.size": ("grpc_server_max_metadata_size", _positive),
    "grpc.server.flow.control.window": ("grpc_server_flow_control_window", _positive),
    "grpc.server.keepalive.without.calls.enabled": ("grpc_keepalive_without_calls", _bool),
    "grpc.server.keepalive.time": ("grpc_keepalive_time_ms", _positive),
    "grpc.server.keepalive.timeout": ("grpc_keepalive_timeout_ms", _positive),
    "grpc.client.max.inbound.message.size": ("grpc_client_max_message_size", _positive),
    "grpc.client.flow.control.window": ("grpc_client_flow_control_window", _positive),
    "queue.max.free.time": ("queue_max_free_time_ms", _positive),
    "queue.check.interval": ("queue_check_interval_ms", _positive),
    "consume.msg.waiting.timeout": ("consume_msg_waiting_timeout_ms", _positive),
    "grpc.oncompleted.wait.timeout": ("grpc_oncompleted_wait_timeout_s", _positive),
    "grpc.server.cert.chain.file": ("grpc_server_cert_chain_file", str.strip),
    "grpc.server.private.key.file": ("grpc_server_private_key_file", str.strip),
    "grpc.server.ca.file": ("grpc_server_ca_file", str.strip),
    "https.server.cert.chain.file": ("https_server_cert_chain_file", str.strip),
    "https.server.private.key.file": ("https_server_private_key_file", str.strip),
    "https.server.ca.file": ("https_server_ca_file", str.strip),
    # psi-run additions (documented in the README).
    "route.table.reload.interval": ("route_reload_interval_ms", _positive),
    "forward.retry.timeout": ("forward_retry_timeout_ms", _non_negative),
    "message.max.size": ("message_max_size", _positive),
    "queue.max.total.bytes": ("queue_max_total_bytes", _positive),
    "queue.max.session.bytes": ("queue_max_session_bytes", _positive),
    "relay.max.hops": ("relay_max_hops", _positive),
    "auth.token": ("auth_token", str.strip),
    "memory.trim.interval": ("memory_trim_interval_ms", _non_negative),
    "log.dir": ("log_dir", str.strip),
    "queue.durable": ("queue_durable", _bool),
    "queue.store.dir": ("queue_store_dir", str.strip),
    "queue.store.fsync": ("queue_store_fsync", _bool),
    "invoke.batch.enabled": ("invoke_batch_enabled", _bool),
}

# OSX keys that have no meaning for this broker: accepted, and logged as ignored.
IGNORED_KEYS = frozenset(
    {
        "eggroll.cluster.manager.ip",
        "eggroll.cluster.manager.port",
        "http.servlet.path",
        "http.ssl.trust.store.type",
        "grpc.server.keystore.file",
        "grpc.server.keystore.file.password",
        "grpc.server.trust.keystore.file",
        "grpc.server.trust.keystore.file.password",
        "https.server.keystore.file",
        "https.server.keystore.file.password",
        "https.server.trust.keystore.file",
        "https.server.trust.keystore.file.password",
    }
)


@dataclass(frozen=True)
class BrokerConfig:
    """Every setting of one broker, with OSX's defaults."""

    conf_dir: Path
    grpc_port: int = 9370
    bind_host: str = "0.0.0.0"
    tls_bind_host: str | None = None  # TLS listeners (grpc.tls.port, https.port); None: bind_host
    open_grpc_tls_server: bool = False
    grpc_tls_port: int | None = None
    open_http_server: bool = False
    http_port: int | None = None
    open_https_server: bool = False
    https_port: int | None = None
    http_context_path: str = "/v1"
    grpc_max_concurrent_calls: int = 1000
    grpc_server_max_message_size: int = 2147483647
    grpc_server_max_metadata_size: int = 134217728
    grpc_server_flow_control_window: int = 134217728
    grpc_keepalive_without_calls: bool = True
    grpc_keepalive_time_ms: int = 7_200_000
    grpc_keepalive_timeout_ms: int = 3_600_000
    grpc_client_max_message_size: int = 2147483647
    grpc_client_flow_control_window: int = 134217728
    queue_max_free_time_ms: int = 43_200_000
    queue_check_interval_ms: int = 60_000
    consume_msg_waiting_timeout_ms: int = 3_600_000
    grpc_oncompleted_wait_timeout_s: int = 600
    grpc_server_cert_chain_file: str | None = None
    grpc_server_private_key_file: str | None = None
    grpc_server_ca_file: str | None = None
    https_server_cert_chain_file: str | None = None
    https_server_private_key_file: str | None = None
    https_server_ca_file: str | None = None
    route_reload_interval_ms: int = 1000
    forward_retry_timeout_ms: int = 60_000
    message_max_size: int = 256 * 1024 * 1024
    queue_max_total_bytes: int = 2 * 1024 * 1024 * 1024
    queue_max_session_bytes: int = 1024 * 1024 * 1024
    relay_max_hops: int = 8
    auth_token: str | None = field(default=None, repr=False)
    memory_trim_interval_ms: int = 10_000
    log_dir: str | None = None
    queue_durable: bool = True
    queue_store_dir: str = "store"  # relative to the conf dir
    queue_store_fsync: bool = False
    invoke_batch_enabled: bool = True  # false: answer invoke-batch as OSX does (not found)
    ignored_keys: tuple[str, ...] = ()
    unknown_keys: tuple[str, ...] = ()

    @property
    def route_table_path(self) -> Path:
        return self.conf_dir / ROUTE_TABLE_FILE

    def resolve(self, path: str) -> Path:
        """A path from the config, relative ones taken against the conf dir."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else (self.conf_dir / p)


def parse_properties(text: str) -> dict[str, str]:
    """Parse Java-properties text into a dict (later keys win, as in Java)."""
    result: dict[str, str] = {}
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#!":
            continue
        if line.endswith("\\") and not line.endswith("\\\\"):
            pending = line[:-1]
            continue
        cut = len(line)
        for i, ch in enumerate(line):
            if ch in "=:" or ch.isspace():
                cut = i
                break
        key = line[:cut].strip()
        rest = line[cut:].lstrip()
        if rest[:1] in ("=", ":"):
            rest = rest[1:]
        result[key] = rest.strip()
    return result


def load_config(conf_dir: str | os.PathLike[str]) -> BrokerConfig:
    """Read ``conf_dir/broker.properties``; raise ConfigError listing every problem."""
    conf = Path(conf_dir).expanduser().resolve()
    path = conf / PROPERTIES_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            str(path), ["file not found; create it (see conf/alice/broker.properties)"]
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc}"]) from None

    values: dict[str, object] = {}
    problems: list[str] = []
    ignored: list[str] = []
    unknown: list[str] = []
    for key, raw in parse_properties(text).items():
        if key in IGNORED_KEYS:
            ignored.append(key)
            continue
        spec = _KEYS.get(key)
        if spec is None:
            unknown.append(key)
            continue
        name, convert = spec
        if raw == "" and name not in ("http_context_path",):
            problems.append(f"{key}: value is empty")
            continue
        try:
            values[name] = convert(raw)  # type: ignore[operator]
        except ValueError as exc:
            problems.append(f"{key}: {exc}")

    cfg = BrokerConfig(
        conf_dir=conf, ignored_keys=tuple(ignored), unknown_keys=tuple(unknown), **values
    )
    problems.extend(_cross_checks(cfg))
    if problems:
        raise ConfigError(str(path), problems)
    return cfg


def _cross_checks(cfg: BrokerConfig) -> list[str]:
    problems = []
    if cfg.open_http_server and cfg.http_port is None:
        problems.append("http.port: required when open.http.server = true")
    if cfg.open_https_server:
        if cfg.https_port is None:
            problems.append("https.port: required when open.https.server = true")
        for key, value in (
            ("https.server.cert.chain.file", cfg.https_server_cert_chain_file),
            ("https.server.private.key.file", cfg.https_server_private_key_file),
        ):
            if not value:
                problems.append(f"{key}: required when open.https.server = true")
    if cfg.open_grpc_tls_server:
        if cfg.grpc_tls_port is None:
            problems.append("grpc.tls.port: required when open.grpc.tls.server = true")
        for key, value in (
            ("grpc.server.cert.chain.file", cfg.grpc_server_cert_chain_file),
            ("grpc.server.private.key.file", cfg.grpc_server_private_key_file),
        ):
            if not value:
                problems.append(f"{key}: required when open.grpc.tls.server = true")
    for key in (
        "grpc_server_cert_chain_file",
        "grpc_server_private_key_file",
        "grpc_server_ca_file",
        "https_server_cert_chain_file",
        "https_server_private_key_file",
        "https_server_ca_file",
    ):
        value = getattr(cfg, key)
        if value and not cfg.resolve(value).is_file():
            prop = key.replace("_", ".")
            problems.append(f"{prop}: file not found: {cfg.resolve(value)}")
    return problems


def with_overrides(cfg: BrokerConfig, **changes: object) -> BrokerConfig:
    """A copy of ``cfg`` with some fields replaced (used by the CLI's flags)."""
    return dataclasses.replace(cfg, **changes)
