"""Server-side TLS material for the gRPC TLS port and the HTTPS port (PEM files).

With a CA file configured, clients must present a certificate signed by it (mutual TLS).
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from .config import BrokerConfig


def _resolve(cfg: BrokerConfig, value: str | None) -> Path | None:
    return cfg.resolve(value) if value else None


def https_context(cfg: BrokerConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(
        str(_resolve(cfg, cfg.https_server_cert_chain_file)),
        str(_resolve(cfg, cfg.https_server_private_key_file)),
    )
    ca = _resolve(cfg, cfg.https_server_ca_file)
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def grpc_server_credentials(cfg: BrokerConfig) -> grpc.ServerCredentials:
    key = _resolve(cfg, cfg.grpc_server_private_key_file).read_bytes()  # type: ignore[union-attr]
    chain = _resolve(cfg, cfg.grpc_server_cert_chain_file).read_bytes()  # type: ignore[union-attr]
    ca = _resolve(cfg, cfg.grpc_server_ca_file)
    return grpc.ssl_server_credentials(
        [(key, chain)],
        root_certificates=ca.read_bytes() if ca else None,
        require_client_auth=ca is not None,
    )
