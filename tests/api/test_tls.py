"""fleettrust.api.tls against real uvicorn servers, real sockets and independent TLS clients.

Every server listens on 127.0.0.1 on a port the kernel picks (``port=0``) and runs in a
background thread (``asyncio.run(serve_many([...]))``); every client call has a timeout and
every server is stopped at the end of its test or module.

These tests are also the tripwire for the uvicorn internals the module relies on (ADR 0003):
if a uvicorn upgrade stops calling ``self.app`` per request or changes the protocol
constructor, ``test_httpx_sees_peer_certificate`` fails first.

Note on TLS 1.3: the client finishes its side of the handshake before the server has checked
the client certificate, so a rejected client sees the connection closed on its first read
rather than a handshake error. Python's asyncio also drops the fatal alert OpenSSL generates
(CPython gh-98078), so on both versions the rejected client sees EOF/reset, not an alert.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import fleettrust
from fleettrust.api.tls import (
    CLOSE_GRACE_SECONDS,
    HTTPTOOLS_AVAILABLE,
    ConnectionRegistry,
    ManagedServer,
    build_server_ssl_context,
    make_server,
    serve_many,
    tls_info,
    tls_protocol_class,
)

TIMEOUT = 10.0
DEVICE_CN = "device-0001"
IMPLEMENTATIONS = ["h11", "httptools"] if HTTPTOOLS_AVAILABLE else ["h11"]


# ------------------------------------------------------------------------------------------
# Throw-away PKI
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _validity(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return builder.not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(
        now + dt.timedelta(days=1)
    )


def _make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return key, _validity(builder).sign(key, hashes.SHA256())


def _issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, cn: str, *, server: bool
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, _validity(builder).sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("tls-pki")
    ca_key, ca_cert = _make_ca("Test Fleet Root")
    server_key, server_cert = _issue(ca_key, ca_cert, "gateway.test", server=True)
    client_key, client_cert = _issue(ca_key, ca_cert, DEVICE_CN, server=False)
    rogue_ca_key, rogue_ca_cert = _make_ca("Rogue Root")
    rogue_key, rogue_cert = _issue(rogue_ca_key, rogue_ca_cert, "rogue-device", server=False)
    files: dict[str, bytes] = {
        "ca.pem": _cert_pem(ca_cert),
        "server.pem": _cert_pem(server_cert),
        "server.key": _key_pem(server_key),
        "client.pem": _cert_pem(client_cert),
        "client.key": _key_pem(client_key),
        "rogue.pem": _cert_pem(rogue_cert),
        "rogue.key": _key_pem(rogue_key),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Pki(
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        rogue_cert=d / "rogue.pem",
        rogue_key=d / "rogue.key",
    )


def client_context(
    pki: Pki, *, cert: str | None = "client", max_version: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca))
    if cert == "client":
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    elif cert == "rogue":
        ctx.load_cert_chain(pki.rogue_cert, pki.rogue_key)
    if max_version is not None:
        ctx.maximum_version = max_version
    return ctx


def gateway_context(pki: Pki) -> ssl.SSLContext:
    return build_server_ssl_context(
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        client_ca_file=str(pki.ca),
        require_client_cert=True,
    )


# ------------------------------------------------------------------------------------------
# Test application and server harness
# ------------------------------------------------------------------------------------------


def common_name(der: bytes | None) -> str | None:
    if der is None:
        return None
    attrs = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value)


def make_app(registry: ConnectionRegistry) -> Starlette:
    """Tiny gateway: who am I, bind my connection to a key, close every connection of a key."""

    async def whoami(request: Request) -> JSONResponse:
        request.app.state.requests_seen += 1
        info = tls_info(request.scope)
        if info is None:
            return JSONResponse({"tls": None})
        return JSONResponse(
            {
                "cn": common_name(info["peer_cert_der"]),
                "tls_version": info["tls_version"],
                "cipher": info["cipher"],
                "session_reused": info["session_reused"],
                "connection_id": info["connection_id"],
            }
        )

    async def bind(request: Request) -> JSONResponse:
        info = tls_info(request.scope)
        assert info is not None
        reg: ConnectionRegistry = request.app.state.registry
        bound = reg.bind(info["connection_id"], request.path_params["key"])
        return JSONResponse({"bound": bound, "connection_id": info["connection_id"]})

    async def kick(request: Request) -> JSONResponse:
        reg: ConnectionRegistry = request.app.state.registry
        return JSONResponse({"closed": reg.close(request.path_params["key"])})

    app = Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/bind/{key}", bind, methods=["POST"]),
            Route("/kick/{key}", kick, methods=["POST"]),
        ]
    )
    app.state.registry = registry
    app.state.requests_seen = 0
    return app


def quiet_server(
    app: Starlette,
    ssl_context: ssl.SSLContext | None,
    registry: ConnectionRegistry | None,
    *,
    port: int = 0,
) -> ManagedServer:
    return make_server(
        app,
        host="127.0.0.1",
        port=port,
        ssl_context=ssl_context,
        registry=registry,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )


class ServerThread:
    """Runs ``serve_many(servers)`` on a fresh event loop in a daemon thread."""

    def __init__(self, servers: list[ManagedServer]) -> None:
        self.servers = servers
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="uvicorn-test", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(serve_many(self.servers))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + TIMEOUT
        while not all(s.started for s in self.servers):
            assert self.thread.is_alive(), f"server thread died: {self.error!r}"
            assert time.monotonic() < deadline, "servers did not start"
            time.sleep(0.01)
        return self

    def port(self, index: int = 0) -> int:
        return self.servers[index].bound_ports()[0]

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "servers did not shut down"
        assert self.error is None, f"serve_many failed: {self.error!r}"


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@dataclass
class Gateway:
    url: str
    port: int
    registry: ConnectionRegistry
    app: Starlette
    ssl_context: ssl.SSLContext
    runner: ServerThread


@pytest.fixture(scope="module", params=IMPLEMENTATIONS)
def gateway(request: pytest.FixtureRequest, pki: Pki) -> Iterator[Gateway]:
    registry = ConnectionRegistry()
    app = make_app(registry)
    ctx = gateway_context(pki)
    server = quiet_server(app, ctx, registry)
    # Same construction as make_server, but with the implementation pinned by the param.
    server.config.http = tls_protocol_class(registry, implementation=request.param)
    runner = ServerThread([server]).start()
    port = runner.port()
    try:
        yield Gateway(f"https://127.0.0.1:{port}", port, registry, app, ctx, runner)
    finally:
        runner.stop()


def raw_request(
    ctx: ssl.SSLContext, port: int, *, session: ssl.SSLSession | None = None
) -> tuple[dict[str, Any], ssl.SSLSession | None, bool]:
    """One GET /whoami over a fresh TLS connection with Python's ssl; returns the JSON body,
    the session (for resumption) and whether the client resumed."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost", session=session) as tls,
    ):
        tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        # TLS 1.3 tickets arrive after the handshake; the session is complete once read.
        return json.loads(body), tls.session, bool(tls.session_reused)


# ------------------------------------------------------------------------------------------
# Context construction
# ------------------------------------------------------------------------------------------


def test_server_context_settings(pki: Pki) -> None:
    ctx = gateway_context(pki)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert not ctx.options & ssl.OP_NO_TICKET
    assert ctx.num_tickets >= 1
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    tls12 = [c for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"]
    assert tls12
    assert all(c["kea"] == "kx-ecdhe" and c["aead"] for c in tls12)
    # Only the fleet root is trusted, never the system store.
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "Test Fleet Root"),),)]


def test_server_context_argument_checks(pki: Pki) -> None:
    with pytest.raises(ValueError, match="client_ca_file"):
        build_server_ssl_context(
            certfile=pki.server_cert,
            keyfile=pki.server_key,
            client_ca_file=None,
            require_client_cert=True,
        )
    optional = build_server_ssl_context(
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        client_ca_file=str(pki.ca),
        require_client_cert=False,
    )
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    server_only = build_server_ssl_context(
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        client_ca_file=None,
        require_client_cert=False,
    )
    assert server_only.verify_mode == ssl.CERT_NONE


def test_make_server_rejects_overrides_of_the_tls_setup(pki: Pki) -> None:
    app = make_app(ConnectionRegistry())
    for kwargs in ({"http": "h11"}, {"ssl_certfile": "x.pem"}, {"ws": "auto"}, {"workers": 2}):
        with pytest.raises(TypeError, match="does not accept"):
            make_server(app, host="127.0.0.1", port=0, ssl_context=None, registry=None, **kwargs)


# ------------------------------------------------------------------------------------------
# The peer certificate reaches the app
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_version", "expected_version"),
    [(None, "TLSv1.3"), (ssl.TLSVersion.TLSv1_2, "TLSv1.2")],
)
def test_httpx_sees_peer_certificate(
    gateway: Gateway, pki: Pki, max_version: ssl.TLSVersion | None, expected_version: str
) -> None:
    ctx = client_context(pki, max_version=max_version)
    with httpx.Client(verify=ctx, timeout=TIMEOUT) as client:
        first = client.get(f"{gateway.url}/whoami")
        second = client.get(f"{gateway.url}/whoami")
    assert first.status_code == 200
    body = first.json()
    assert body["cn"] == DEVICE_CN
    assert body["tls_version"] == expected_version
    assert body["session_reused"] is False
    if expected_version == "TLSv1.2":
        assert body["cipher"].startswith("ECDHE-")
    # Keep-alive: the second request ran on the same connection, same id.
    assert second.json()["connection_id"] == body["connection_id"]


def test_stock_uvicorn_still_does_not_expose_the_client_certificate(pki: Pki) -> None:
    """Canary for ADR 0003: the custom protocol exists because stock uvicorn (h11, with the
    same SSL context) passes no client certificate to the app. When this fails, uvicorn has
    started exposing it (e.g. Kludex/uvicorn#3132): revisit the ADR and drop our injection."""
    seen: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        seen.append(dict(scope.get("extensions") or {}))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    ctx = gateway_context(pki)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http="h11",
        ws="none",
        ssl_context_factory=lambda _config, _default: ctx,
        log_config=None,
        lifespan="off",
    )
    runner = ServerThread([ManagedServer(config)]).start()
    try:
        with httpx.Client(verify=client_context(pki), timeout=TIMEOUT) as client:
            assert client.get(f"https://127.0.0.1:{runner.port()}/").status_code == 204
    finally:
        runner.stop()
    assert len(seen) == 1
    assert "tls" not in seen[0], f"uvicorn now sets scope['extensions']['tls']: {seen[0]!r}"


def test_curl_sees_the_same(gateway: Gateway, pki: Pki) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    out = subprocess.run(
        [
            curl, "--silent", "--show-error", "--fail", "--max-time", str(int(TIMEOUT)),
            "--cacert", str(pki.ca), "--cert", str(pki.client_cert), "--key", str(pki.client_key),
            f"{gateway.url}/whoami",
        ],
        capture_output=True,
        check=True,
        timeout=TIMEOUT + 5,
    )  # fmt: skip
    body = json.loads(out.stdout)
    assert body["cn"] == DEVICE_CN
    assert body["tls_version"] == "TLSv1.3"


# ------------------------------------------------------------------------------------------
# Rejected clients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cert", [None, "rogue"], ids=["no-cert", "other-ca"])
@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_client_without_valid_certificate_is_rejected(
    gateway: Gateway, pki: Pki, cert: str | None, max_version: ssl.TLSVersion | None
) -> None:
    ctx = client_context(pki, cert=cert, max_version=max_version)
    seen_before = gateway.app.state.requests_seen

    # Python ssl: TLS 1.2 fails inside the handshake; TLS 1.3 completes the client side of
    # the handshake, then the server's rejection shows as EOF/reset on the first read.
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as raw:
        if max_version == ssl.TLSVersion.TLSv1_2:
            with pytest.raises(ssl.SSLError, match=r"UNEXPECTED_EOF|EOF occurred"):
                ctx.wrap_socket(raw, server_hostname="localhost")
        else:
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() == "TLSv1.3"
                tls.sendall(b"GET /whoami HTTP/1.1\r\nHost: localhost\r\n\r\n")
                try:
                    reply = tls.recv(65536)
                except (ssl.SSLError, ConnectionResetError):
                    reply = b""
                assert reply == b""

    # httpx: ConnectError (1.2) or "server disconnected" (1.3), never a response.
    expected = httpx.ConnectError if max_version == ssl.TLSVersion.TLSv1_2 else httpx.TransportError
    with httpx.Client(verify=ctx, timeout=TIMEOUT) as client, pytest.raises(expected):
        client.get(f"{gateway.url}/whoami")

    assert gateway.app.state.requests_seen == seen_before  # the app never ran


# ------------------------------------------------------------------------------------------
# Connection registry
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [1.0, 0.0], ids=["graceful", "abort"])
def test_registry_close_from_another_thread(gateway: Gateway, pki: Pki, grace: float) -> None:
    """The client stays idle (it is not reading), so it never answers the server's TLS
    close_notify: the graceful variant is completed by the abort after ``grace`` seconds."""
    registry = gateway.registry
    with httpx.Client(verify=client_context(pki), timeout=TIMEOUT) as client:
        bound = client.post(f"{gateway.url}/bind/device-A").json()
        assert bound["bound"] is True
        conn_id = bound["connection_id"]
        assert client.get(f"{gateway.url}/whoami").json()["connection_id"] == conn_id
        assert registry.connection_ids("device-A") == {conn_id}
        assert registry.key_of(conn_id) == "device-A"

        assert registry.close("device-A", grace=grace) == 1  # called off the loop thread
        # The server saw the close: connection_lost ran and unregistered the connection.
        wait_until(lambda: conn_id not in registry, "server-side connection_lost")
        assert registry.connection_ids("device-A") == frozenset()
        assert registry.close("device-A") == 0

        # The kept-alive connection is gone: httpx either fails or opens a new connection.
        try:
            after = client.get(f"{gateway.url}/whoami").json()
        except httpx.TransportError:
            pass
        else:
            assert after["connection_id"] != conn_id


def test_registry_close_from_the_app_closes_all_connections_of_a_key(
    gateway: Gateway, pki: Pki
) -> None:
    registry = gateway.registry
    victims = [httpx.Client(verify=client_context(pki), timeout=TIMEOUT) for _ in range(3)]
    try:
        ids = {c.post(f"{gateway.url}/bind/device-B").json()["connection_id"] for c in victims}
        assert len(ids) == 3
        assert registry.connection_ids("device-B") == ids
        with httpx.Client(verify=client_context(pki), timeout=TIMEOUT) as operator:
            kicked = operator.post(f"{gateway.url}/kick/device-B").json()
            assert kicked == {"closed": 3}
            own_id = operator.get(f"{gateway.url}/whoami").json()["connection_id"]
            assert own_id in registry  # other connections are untouched
        wait_until(lambda: not any(i in registry for i in ids), "connections closed")
    finally:
        for client in victims:
            client.close()


def test_registry_rebind_and_no_leak(gateway: Gateway, pki: Pki) -> None:
    registry = gateway.registry
    with httpx.Client(verify=client_context(pki), timeout=TIMEOUT) as client:
        conn_id = client.post(f"{gateway.url}/bind/old-key").json()["connection_id"]
        client.post(f"{gateway.url}/bind/new-key")
        assert registry.connection_ids("old-key") == frozenset()
        assert registry.connection_ids("new-key") == {conn_id}
    for _ in range(20):
        with httpx.Client(verify=client_context(pki), timeout=TIMEOUT) as client:
            client.post(f"{gateway.url}/bind/churn")
    # Normal closes leave nothing behind: no connections, no key index entries.
    wait_until(lambda: len(registry) == 0, "all connections unregistered")
    assert registry.connection_ids("churn") == frozenset()
    assert registry.connection_ids("new-key") == frozenset()
    assert registry.bind(conn_id, "late") is False  # closed connection cannot be bound


# ------------------------------------------------------------------------------------------
# Session resumption
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_session_resumption(gateway: Gateway, pki: Pki, max_version: ssl.TLSVersion | None) -> None:
    ctx = client_context(pki, max_version=max_version)
    hits_before = gateway.ssl_context.session_stats()["hits"]

    first, session, reused = raw_request(ctx, gateway.port)
    assert reused is False
    assert first["session_reused"] is False
    assert session is not None

    second, _, reused = raw_request(ctx, gateway.port, session=session)
    assert reused is True  # client view
    assert second["session_reused"] is True  # server view, from the scope
    assert second["cn"] == DEVICE_CN  # the resumed session still carries the certificate
    assert second["connection_id"] != first["connection_id"]
    assert gateway.ssl_context.session_stats()["hits"] > hits_before


@pytest.mark.parametrize("version_flag", ["-tls1_3", "-tls1_2"])
def test_session_resumption_with_openssl_s_client(
    gateway: Gateway, pki: Pki, tmp_path: Path, version_flag: str
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    sess = tmp_path / "session.pem"
    request = b"GET /whoami HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    base = [
        openssl, "s_client", version_flag, "-ign_eof", "-connect", f"127.0.0.1:{gateway.port}",
        "-servername", "localhost", "-CAfile", str(pki.ca),
    ]  # fmt: skip
    first = subprocess.run(
        [*base, "-cert", str(pki.client_cert), "-key", str(pki.client_key), "-sess_out", str(sess)],
        input=request, capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    assert b"\nNew, TLSv1." in first.stdout
    # Resume WITHOUT presenting the certificate again: the session carries it.
    second = subprocess.run(
        [*base, "-sess_in", str(sess)],
        input=request, capture_output=True, timeout=TIMEOUT, check=True,
    )  # fmt: skip
    assert b"\nReused, TLSv1." in second.stdout
    body = json.loads(second.stdout[second.stdout.index(b'{"cn"') :].split(b"}")[0] + b"}")
    assert body["session_reused"] is True
    assert body["cn"] == DEVICE_CN


# ------------------------------------------------------------------------------------------
# Robustness
# ------------------------------------------------------------------------------------------


def test_plain_http_to_tls_port_is_refused_cleanly(
    gateway: Gateway, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=TIMEOUT) as raw:
        raw.sendall(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        data = b""
        try:
            while chunk := raw.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert not data.startswith(b"HTTP/")  # no HTTP answer, connection closed by the server

    # The server is still up and serving TLS.
    assert gateway.runner.thread.is_alive()
    with httpx.Client(verify=client_context(pki), timeout=TIMEOUT) as client:
        assert client.get(f"{gateway.url}/whoami").json()["cn"] == DEVICE_CN
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_shutdown_with_an_idle_kept_alive_client_is_prompt(pki: Pki) -> None:
    """uvicorn closes idle connections at shutdown; asyncio then waits for the peer's TLS
    close_notify (up to 30 s). The protocol aborts after CLOSE_GRACE_SECONDS instead."""
    registry = ConnectionRegistry()
    server = quiet_server(make_app(registry), gateway_context(pki), registry)
    server.config.timeout_graceful_shutdown = 30
    runner = ServerThread([server]).start()
    with httpx.Client(verify=client_context(pki), timeout=TIMEOUT) as idle:
        idle.get(f"https://127.0.0.1:{runner.port()}/whoami")
        started = time.monotonic()
        runner.stop()
        assert time.monotonic() - started < CLOSE_GRACE_SECONDS + 2
    assert len(registry) == 0


# ------------------------------------------------------------------------------------------
# Several listeners on one loop
# ------------------------------------------------------------------------------------------


def test_serve_many_operator_api_and_gateway(pki: Pki) -> None:
    operator_registry, gateway_registry = ConnectionRegistry(), ConnectionRegistry()
    operator_ctx = build_server_ssl_context(
        certfile=pki.server_cert,
        keyfile=pki.server_key,
        client_ca_file=None,
        require_client_cert=False,
    )
    operator = quiet_server(make_app(operator_registry), operator_ctx, operator_registry)
    gateway = quiet_server(make_app(gateway_registry), gateway_context(pki), gateway_registry)
    runner = ServerThread([operator, gateway]).start()
    try:
        no_cert = client_context(pki, cert=None)
        with httpx.Client(verify=no_cert, timeout=TIMEOUT) as client:
            body = client.get(f"https://127.0.0.1:{runner.port(0)}/whoami").json()
            assert body["cn"] is None  # operator listener: TLS, no client certificate
            with pytest.raises(httpx.TransportError):
                client.get(f"https://127.0.0.1:{runner.port(1)}/whoami")
        with httpx.Client(verify=client_context(pki), timeout=TIMEOUT) as client:
            assert client.get(f"https://127.0.0.1:{runner.port(1)}/whoami").json()["cn"] == (
                DEVICE_CN
            )
        # Shared fate: stopping one listener stops the other.
        started = time.monotonic()
        gateway.should_exit = True
        runner.thread.join(TIMEOUT)
        assert not runner.thread.is_alive()
        assert operator.should_exit
        assert time.monotonic() - started < TIMEOUT
    finally:
        runner.stop()


def test_serve_many_startup_failure_stops_the_others(pki: Pki) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        busy_port = busy.getsockname()[1]
        registry = ConnectionRegistry()
        healthy = quiet_server(make_app(registry), gateway_context(pki), registry)
        doomed = quiet_server(make_app(registry), gateway_context(pki), registry, port=busy_port)
        runner = ServerThread([healthy, doomed])
        runner.thread.start()
        runner.thread.join(TIMEOUT)
        assert not runner.thread.is_alive()
        assert isinstance(runner.error, RuntimeError)
        assert "failed to start" in str(runner.error)
        assert healthy.should_exit


def test_serve_many_sigterm_shuts_down_both_listeners(pki: Pki, tmp_path: Path) -> None:
    """In the main thread serve_many owns SIGTERM: both servers stop, the previous handler is
    restored and the signal re-raised to it (as uvicorn.Server.serve does)."""
    script = tmp_path / "two_listeners.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import asyncio, signal, sys
            from starlette.applications import Starlette
            from fleettrust.api.tls import *

            ctx = build_server_ssl_context(
                certfile={str(pki.server_cert)!r}, keyfile={str(pki.server_key)!r},
                client_ca_file={str(pki.ca)!r}, require_client_cert=True)
            reg = ConnectionRegistry()
            kw = dict(host="127.0.0.1", port=0, registry=reg, log_config=None, lifespan="off")
            servers = [make_server(Starlette(), ssl_context=ctx, **kw),
                       make_server(Starlette(), ssl_context=None, **kw)]

            def reraised(sig, frame):
                # serve_many restored this handler and re-raised SIGTERM after the shutdown.
                print("reraised", all(s.should_exit for s in servers), flush=True)
                sys.exit(0)

            signal.signal(signal.SIGTERM, reraised)

            async def main():
                async def announce():
                    while not all(s.started for s in servers):
                        await asyncio.sleep(0.01)
                    print("ready", flush=True)
                task = asyncio.create_task(announce())
                await serve_many(servers)
                print("returned without re-raising", flush=True)

            asyncio.run(main())
            """
        )
    )
    src_dir = str(Path(fleettrust.__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(filter(None, [src_dir, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath}
    with subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    ) as proc:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline() == b"ready\n"
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out == b"reraised True\n", (out, err)
