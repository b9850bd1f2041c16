"""TLS end to end: gRPC-TLS and HTTPS listeners, mutual TLS, TLS routes, tls.bind.host.

Certificates are made here with ``cryptography`` (a CA, a server certificate per broker with
subjectAltName IP 127.0.0.1, IP 127.0.0.2 and DNS localhost, a client certificate signed by the
CA, and a rogue CA with a client certificate of its own). Only 127.0.0.x is ever contacted.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import os
import random
import socket
import ssl
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import (
    _hdr,
    _http,
    assert_same_rows,
    expected_rows,
    make_ids,
    read_result,
    run_ok,
    write_csv,
    write_spec,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker import codes
from broker.config import load_config
from broker.proto import ptp_pb2, ptp_pb2_grpc
from harness.localnet import LocalBroker

SERVERS = ("alice", "bob", "carol")


# ---------------------------------------------------------------------------------------------
# Certificates


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "psi-run tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _issue(
    subject: str,
    key,
    issuer: tuple[x509.Name, object, object] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    """A certificate for ``key``; ``issuer`` is (name, key, cert) or None for self-signed."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name(subject)
    issuer_name, issuer_key, issuer_cert = issuer or (name, key, None)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(ski, critical=False)
    )
    if issuer_cert is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    if ca:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        b = b.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_encipherment=False,
                key_cert_sign=False,
                crl_sign=False,
                content_commitment=False,
                data_encipherment=False,
                key_agreement=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else [ExtendedKeyUsageOID.CLIENT_AUTH]
        b = b.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.2")),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(folder: Path, stem: str, key, cert: x509.Certificate) -> tuple[str, str]:
    crt, pem_key = folder / f"{stem}.crt", folder / f"{stem}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(crt), str(pem_key)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, str]:
    """PEM files: ca, <party>.crt/.key for each broker, client, rogue-ca and rogue-client."""
    folder = tmp_path_factory.mktemp("pki")
    files: dict[str, str] = {}
    for ca_stem, client_stem, servers in (
        ("ca", "client", SERVERS),
        ("rogue-ca", "rogue-client", ()),
    ):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue(f"{ca_stem} root", ca_key, None, ca=True)
        files[ca_stem], _ = _write(folder, ca_stem, ca_key, ca_cert)
        issuer = (ca_cert.subject, ca_key, ca_cert)
        for party in servers:
            key = ec.generate_private_key(ec.SECP256R1())
            files[f"{party}.crt"], files[f"{party}.key"] = _write(
                folder, party, key, _issue(f"broker {party}", key, issuer, server=True)
            )
        key = ec.generate_private_key(ec.SECP256R1())
        files[f"{client_stem}.crt"], files[f"{client_stem}.key"] = _write(
            folder, client_stem, key, _issue(client_stem, key, issuer)
        )
    return files


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


# ---------------------------------------------------------------------------------------------
# Brokers


def _tls_properties(pki: dict[str, str], party: str, **extra: str) -> dict[str, str]:
    """gRPC-TLS and HTTPS on port 0, both requiring a client certificate signed by the CA."""
    return {
        "open.grpc.tls.server": "true",
        "grpc.tls.port": "0",
        "grpc.server.cert.chain.file": pki[f"{party}.crt"],
        "grpc.server.private.key.file": pki[f"{party}.key"],
        "grpc.server.ca.file": pki["ca"],
        "open.https.server": "true",
        "https.port": "0",
        "https.server.cert.chain.file": pki[f"{party}.crt"],
        "https.server.private.key.file": pki[f"{party}.key"],
        "https.server.ca.file": pki["ca"],
        # A TLS route that cannot connect fails the test in seconds, not after 60 s of retries.
        "forward.retry.timeout": "5000",
        **extra,
    }


def _host_port(broker: LocalBroker, name: str) -> tuple[str, int]:
    host, port = broker.addresses[name].rsplit(":", 1)
    return host, int(port)


def _tls_route(pki: dict[str, str], peer: LocalBroker, protocol: str) -> list[dict]:
    """A mutual-TLS route to ``peer``: gRPC to its grpcs port, or HTTP to its https URL."""
    files = {
        "useSSL": True,
        "certChainFile": pki["client.crt"],
        "privateKeyFile": pki["client.key"],
        "caFile": pki["ca"],
    }
    if protocol == "http":
        _, port = _host_port(peer, "https")
        return [
            {
                "protocol": "http",
                "url": f"https://127.0.0.1:{port}/v1/interconn/chan/invoke",
                **files,
            }
        ]
    _, port = _host_port(peer, "grpcs")
    return [{"ip": "127.0.0.1", "port": port, **files}]


@pytest.fixture
def tls_pair(tmp_path: Path, pki, request):
    """alice and bob, routed to each other over mutual TLS (``request.param``: grpc or http)."""
    protocol = getattr(request, "param", "grpc")
    pair = [
        LocalBroker(p, tmp_path / f"broker-{p}", _tls_properties(pki, p)) for p in ("alice", "bob")
    ]
    try:
        for b in pair:
            b.write_config({})
            b.start()
        alice, bob = pair
        alice.write_routes({"bob": {"default": _tls_route(pki, bob, protocol)}})
        bob.write_routes({"alice": {"default": _tls_route(pki, alice, protocol)}})
        alice.wait_routes(["bob"])
        bob.wait_routes(["alice"])
        yield pair
    finally:
        for b in pair:
            b.stop()


# ---------------------------------------------------------------------------------------------
# Clients (never through a proxy: only 127.0.0.x is contacted)

_NO_PROXY = [("grpc.enable_http_proxy", 0)]


def _open(url_or_req, ctx: ssl.SSLContext | None = None):
    handlers: list = [urllib.request.ProxyHandler({})]
    if ctx is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ctx))
    return urllib.request.build_opener(*handlers).open(url_or_req, timeout=10)


def _grpc_invoke(
    address: str,
    pki: dict[str, str],
    client: str | None,
    session: str,
    payload: bytes = b"via grpcs",
    target: str = "bob",
) -> ptp_pb2.Outbound:
    """PrivateTransferProtocol.invoke over TLS, as alice's broker would call bob's."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(pki["ca"]),
        private_key=_read(pki[f"{client}.key"]) if client else None,
        certificate_chain=_read(pki[f"{client}.crt"]) if client else None,
    )
    with grpc.secure_channel(address, creds, options=_NO_PROXY) as ch:
        stub = ptp_pb2_grpc.PrivateTransferProtocolStub(ch)
        return stub.invoke(
            ptp_pb2.Inbound(payload=payload),
            metadata=(
                ("x-ptp-session-id", session),
                ("x-ptp-topic", "t"),
                ("x-ptp-source-node-id", "alice"),
                ("x-ptp-target-node-id", target),
            ),
            timeout=10,
        )


def _https_get(address: str, pki: dict[str, str], client: str | None) -> dict:
    """GET /health on the HTTPS port, verifying the server against the CA."""
    ctx = ssl.create_default_context(cafile=pki["ca"])
    if client:
        ctx.load_cert_chain(pki[f"{client}.crt"], pki[f"{client}.key"])
    with _open(f"https://{address}/health", ctx) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("tls_pair", ["grpc", "http"], indirect=True)
def test_push_at_alice_is_popped_at_bob_over_mutual_tls_route(tls_pair):
    alice, bob = tls_pair
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value
    r = _http(alice, "push", _hdr("s1", "alice-bob", "alice", "bob"), payload)
    assert r.code == codes.OK, r.message
    got = _http(bob, "pop", _hdr("s1", "alice-bob", "bob"), query="?timeout=5")
    assert got.code == codes.OK and got.payload == payload
    # and the other way round, over bob's route to alice
    r = _http(bob, "push", _hdr("s1", "bob-alice", "bob", "alice"), b"reply")
    assert r.code == codes.OK, r.message
    got = _http(alice, "pop", _hdr("s1", "bob-alice", "alice"), query="?timeout=5")
    assert got.code == codes.OK and got.payload == b"reply"
    assert "MSG_REDIRECT" in alice.flow_log()


def test_psi_through_grpc_tls_routes_matches_pandas(tmp_path, tls_pair):
    rng = random.Random("tls")
    shared = make_ids(200, "s", rng)
    a = shared + make_ids(150, "a", rng)
    b = shared + make_ids(100, "b", rng)
    rng.shuffle(a)
    rng.shuffle(b)
    write_csv(tmp_path / "data/alice.csv", {"uid": a, "age": [str(i % 90) for i in range(len(a))]})
    write_csv(tmp_path / "data/bob.csv", {"uid": b})
    spec = write_spec(tmp_path, tls_pair, protocol="RR22")
    run_ok(spec, ["alice", "bob"], timeout_s=120)
    for me, other in (("alice", "bob"), ("bob", "alice")):
        got = read_result(tmp_path / f"out/{me}_psi.csv")
        want = expected_rows(tmp_path / f"data/{me}.csv", tmp_path / f"data/{other}.csv", ["uid"])
        assert len(want) == 200
        assert_same_rows(got, want)


def test_grpc_tls_port_requires_a_client_certificate_signed_by_the_ca(tls_pair, pki):
    _, bob = tls_pair
    address = bob.addresses["grpcs"]
    for client in (None, "rogue-client"):
        with pytest.raises(grpc.RpcError) as info:
            _grpc_invoke(address, pki, client, "m1")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (client, info.value)
    out = _grpc_invoke(address, pki, "client", "m1", b"trusted")
    assert out.code == codes.OK, out.message
    got = _http(bob, "pop", _hdr("m1", "t", "bob"), query="?timeout=5")
    assert got.code == codes.OK and got.payload == b"trusted"


def test_https_port_requires_a_client_certificate_signed_by_the_ca(tls_pair, pki):
    _, bob = tls_pair
    address = bob.addresses["https"]
    for client in (None, "rogue-client"):
        with pytest.raises((OSError, http.client.HTTPException)):
            _https_get(address, pki, client)
    assert _https_get(address, pki, "client")["self_party"] == ["bob"]


def test_tls_client_refuses_a_server_certificate_from_another_ca(tls_pair, pki):
    _, bob = tls_pair
    ctx = ssl.create_default_context(cafile=pki["rogue-ca"])
    ctx.load_cert_chain(pki["client.crt"], pki["client.key"])
    with pytest.raises(urllib.error.URLError) as info:
        _open(f"https://{bob.addresses['https']}/health", ctx)
    assert isinstance(info.value.reason, ssl.SSLCertVerificationError), info.value
    # gRPC: the client checks bob's certificate against the rogue CA and gives up.
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(pki["rogue-ca"]),
        private_key=_read(pki["client.key"]),
        certificate_chain=_read(pki["client.crt"]),
    )
    with (
        grpc.secure_channel(bob.addresses["grpcs"], creds, options=_NO_PROXY) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        ptp_pb2_grpc.PrivateTransferProtocolStub(ch).invoke(ptp_pb2.Inbound(), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_bind_host_puts_only_the_tls_listeners_on_its_address(tmp_path, pki):
    carol = LocalBroker(
        "carol",
        tmp_path / "broker-carol",
        _tls_properties(pki, "carol", **{"tls.bind.host": "127.0.0.2"}),
    )
    carol.write_config({"alice": {"default": [{"ip": "127.0.0.1", "port": 1}]}})
    carol.start()
    try:
        assert _host_port(carol, "grpc")[0] == "127.0.0.1"
        assert _host_port(carol, "http")[0] == "127.0.0.1"
        assert _host_port(carol, "grpcs")[0] == "127.0.0.2"
        assert _host_port(carol, "https")[0] == "127.0.0.2"
        # TLS works on 127.0.0.2 (the certificate names that address) ...
        out = _grpc_invoke(carol.addresses["grpcs"], pki, "client", "b1", b"on .2", "carol")
        assert out.code == codes.OK, out.message
        got = _http(carol, "pop", _hdr("b1", "t", "carol"), query="?timeout=5")
        assert got.code == codes.OK and got.payload == b"on .2"
        assert _https_get(carol.addresses["https"], pki, "client")["self_party"] == ["carol"]
        # ... and the plain ports are not there, nor the TLS ports on 127.0.0.1: carol's own
        # listening sockets, read from /proc (a connect probe can reach another process that
        # happens to listen on the same port number, as one did in CI).
        ports = {name: _host_port(carol, name)[1] for name in ("grpc", "http", "grpcs", "https")}
        listening = _listening_sockets(carol.proc.pid)
        assert {("127.0.0.1", ports["grpc"]), ("127.0.0.1", ports["http"])} <= listening
        assert {a for a in listening if a[0] != "127.0.0.1"} == {
            ("127.0.0.2", ports["grpcs"]),
            ("127.0.0.2", ports["https"]),
        }
        assert ("127.0.0.1", ports["grpcs"]) not in listening
        assert ("127.0.0.1", ports["https"]) not in listening
    finally:
        carol.stop()


def _listening_sockets(pid: int) -> set[tuple[str, int]]:
    """(address, port) of each TCP socket process ``pid`` listens on (IPv6: ("v6:HEX", port))."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            addr, port = fields[1].split(":")
            v4 = addr[-8:] if table == "tcp" or addr.startswith("0" * 16 + "FFFF0000") else None
            # grpc listens on an IPv4 address through an IPv6 socket (::ffff:a.b.c.d)
            host = socket.inet_ntoa(struct.pack("<I", int(v4, 16))) if v4 else f"v6:{addr}"
            found.add((host, int(port, 16)))
    return found


def test_tls_bind_host_defaults_to_bind_host(tmp_path):
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "broker.properties").write_text("bind.host=127.0.0.1\n")
    assert load_config(conf).tls_bind_host is None
    (conf / "broker.properties").write_text("bind.host=127.0.0.1\ntls.bind.host = 10.1.2.3\n")
    cfg = load_config(conf)
    assert cfg.tls_bind_host == "10.1.2.3" and not cfg.unknown_keys


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unusable_client_certificate_on_a_route_is_named_and_the_broker_keeps_running(
    tmp_path, pki, protocol
):
    # A gRPC route with certChainFile but no privateKeyFile used to abort the whole broker
    # (an assertion in gRPC's C core); now the sender is told at once which file is wrong.
    bob = LocalBroker("bob", tmp_path / "broker-bob", _tls_properties(pki, "bob"))
    bob.write_config({"alice": {"default": [{"ip": "127.0.0.1", "port": 1}]}})
    bob.start()
    alice = LocalBroker("alice", tmp_path / "broker-alice", _tls_properties(pki, "alice"))
    try:
        good = _tls_route(pki, bob, protocol)
        bad = [{k: v for k, v in good[0].items() if k != "privateKeyFile"}]
        if protocol == "http":  # over HTTP the key may sit in the certificate file; it does not
            bad[0]["certChainFile"] = pki["client.crt"]
        alice.write_config({"bob": {"default": bad}})
        alice.start()
        r = _http(alice, "push", _hdr("k1", "t", "alice", "bob"), b"x")
        assert r.code == codes.INTERNAL, r.message
        assert "certChainFile" in r.message and "privateKeyFile" in r.message, r.message
        assert alice.proc.poll() is None and alice.health()["self_party"] == ["alice"]
        alice.write_routes({"bob": {"default": good}})  # fixed by a hot reload
        deadline = time.monotonic() + 10
        while (r := _http(alice, "push", _hdr("k1", "t", "alice", "bob"), b"y")).code != codes.OK:
            assert time.monotonic() < deadline, r.message
            time.sleep(0.1)
        assert _http(bob, "pop", _hdr("k1", "t", "bob"), query="?timeout=5").payload == b"y"
    finally:
        alice.stop()
        bob.stop()
