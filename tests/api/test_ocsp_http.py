"""OCSP over HTTP with real clients: ``openssl ocsp`` (POST, with and without nonce, SHA-1 and
SHA-256 CertIDs), ``curl`` (GET with URL-encoded base64, caching headers, 304), malformed and
foreign requests, and a revocation showing up within a second. The router is mounted on the
operator app exactly as the lead does (``create_app(ctx)`` + ``include_router``)."""

from __future__ import annotations

import base64
import datetime as dt
import re
import secrets
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as cocsp

from fleettrust.api.app import create_app
from fleettrust.api.ocsp_routes import (
    FastHttpToolsProtocol,
    OcspFastPath,
    create_ocsp_app,
    router,
)
from fleettrust.revocation.ocsp_responder import OcspResponder
from fleettrust.services import hierarchy
from fleettrust.services import revocation as revocation_service
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import Certificate
from tests.conftest import Hierarchy, free_port
from tests.revocation.test_ocsp_responder import (
    IssuedCert,
    check_signed_by_delegate,
    foreign_pair,
    issue_devices,
    issuer_of,
    ocsp_request,
    unstored_certificate,
)

OCSP_CT = "application/ocsp-response"


@contextmanager
def serve(app: Any, **options: Any) -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="auto", **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def ocsp_url(ctx: ServiceContext) -> Iterator[str]:
    """The operator app with the OCSP router, and the fast-path middleware outermost."""
    app = create_app(ctx)
    app.include_router(router)
    app.add_middleware(OcspFastPath)
    with serve(app) as url:
        yield f"{url}/ocsp"
    responder: OcspResponder | None = getattr(app.state, "ocsp_responder", None)
    if responder is not None:
        responder.close()


@pytest.fixture
def devices(ctx: ServiceContext, factory_principal: Principal,
            batch: hierarchy.BatchCreated) -> list[IssuedCert]:
    return issue_devices(ctx, factory_principal, batch, 4)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _files(tmp_path: Path, ctx: ServiceContext, fleet: Hierarchy,
           devices: list[IssuedCert]) -> dict[str, Path]:
    issuer = devices[0].issuer
    files = {"issuer": tmp_path / "issuer.pem", "chain": tmp_path / "root-chain.pem"}
    files["issuer"].write_bytes(_pem(issuer))
    files["chain"].write_bytes(_pem(fleet.root_cert) + _pem(issuer_of(ctx, fleet.fleet_ca_id))
                               + _pem(issuer))
    for n, d in enumerate(devices):
        files[f"dev{n}"] = tmp_path / f"dev{n}.pem"
        files[f"dev{n}"].write_bytes(_pem(d.cert))
    return files


def openssl_ocsp(url: str, files: dict[str, Path], cert: Path, *extra: str,
                 digest: str | None = None) -> tuple[str, str]:
    pre = [f"-{digest}"] if digest else []
    out = subprocess.run(
        ["openssl", "ocsp", "-issuer", str(files["issuer"]), *pre, "-cert", str(cert),
         "-url", url,
         "-CAfile", str(files["chain"]), "-resp_text", *extra],
        capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert "Response verify OK" in out.stderr, out.stderr
    return out.stdout, out.stderr


def _line_status(stdout: str, cert: Path) -> str:
    match = re.search(rf"^{re.escape(str(cert))}: (\w+)$", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1)


def _status_in_db(ctx: ServiceContext, cert: x509.Certificate) -> tuple[str, dt.datetime | None,
                                                                       str | None]:
    with ctx.sessions() as s:
        row = s.get(Certificate, format(cert.serial_number, "x"))
        if row is None:
            return "unknown", None, None
        return row.status, row.revoked_at, row.revocation_reason


def test_openssl_ocsp_agrees_with_fleettrust(ctx: ServiceContext, admin: Principal,
                                             fleet: Hierarchy, devices: list[IssuedCert],
                                             ocsp_url: str, tmp_path: Path) -> None:
    files = _files(tmp_path, ctx, fleet, devices)
    good, revoked, held, later = devices
    revocation_service.revoke_device(ctx, admin, revoked.device_id, reason="keyCompromise")
    revocation_service.suspend_device(ctx, admin, held.device_id)
    rogue = tmp_path / "rogue.pem"
    rogue.write_bytes(_pem(unstored_certificate(ctx, good.ca_id)))

    # good: -no_nonce, with a nonce (accepted, not echoed: openssl warns but verifies), SHA-256
    out, err = openssl_ocsp(ocsp_url, files, files["dev0"], "-no_nonce")
    assert _line_status(out, files["dev0"]) == "good"
    assert _status_in_db(ctx, good.cert)[0] == "good"
    assert "Responder Id: " in out
    assert "OCSP Response Status: successful (0x0)" in out
    out, err = openssl_ocsp(ocsp_url, files, files["dev0"])
    assert _line_status(out, files["dev0"]) == "good"
    assert "WARNING: no nonce in response" in err
    out, _ = openssl_ocsp(ocsp_url, files, files["dev0"], "-no_nonce", digest="sha256")
    assert _line_status(out, files["dev0"]) == "good"
    assert "Hash Algorithm: sha256" in out

    # revoked: time and reason as fleettrust recorded them
    out, _ = openssl_ocsp(ocsp_url, files, files["dev1"], "-no_nonce")
    assert _line_status(out, files["dev1"]) == "revoked"
    status, revoked_at, reason = _status_in_db(ctx, revoked.cert)
    assert (status, reason) == ("revoked", "keyCompromise")
    assert "Reason: keyCompromise" in out
    assert revoked_at is not None
    assert f"Revocation Time: {revoked_at.strftime('%b %e %H:%M:%S %Y GMT')}" in out

    # held: revoked with reason certificateHold
    out, _ = openssl_ocsp(ocsp_url, files, files["dev2"], "-no_nonce")
    assert _line_status(out, files["dev2"]) == "revoked"
    assert "Reason: certificateHold" in out
    assert _status_in_db(ctx, held.cert)[0] == "hold"

    # unknown: signed by our CA key, never recorded
    out, _ = openssl_ocsp(ocsp_url, files, rogue, "-no_nonce")
    assert _line_status(out, rogue) == "unknown"

    # several certificates in one request: all answered
    out, _ = openssl_ocsp(ocsp_url, files, files["dev0"], "-cert", str(files["dev1"]),
                          "-cert", str(rogue), "-no_nonce")
    assert [_line_status(out, p) for p in (files["dev0"], files["dev1"], rogue)] == \
        ["good", "revoked", "unknown"]

    # re-signed at once: "later" is cached as good; after its revocation (same process here,
    # the two-process case is in tests/revocation) the next requests see revoked within 1 s
    der = ocsp_request(later.cert, later.issuer)
    with httpx.Client(timeout=10) as client:
        def post() -> cocsp.OCSPResponse:
            r = client.post(ocsp_url, content=der,
                            headers={"content-type": "application/ocsp-request"})
            assert r.status_code == 200
            assert r.headers["content-type"] == OCSP_CT
            return check_signed_by_delegate(r.content, later.issuer)

        assert post().certificate_status is cocsp.OCSPCertStatus.GOOD
        assert post().certificate_status is cocsp.OCSPCertStatus.GOOD  # from the cache
        revocation_service.revoke_device(ctx, admin, later.device_id, reason="superseded")
        start = time.monotonic()
        while post().certificate_status is not cocsp.OCSPCertStatus.REVOKED:
            assert time.monotonic() - start < 1.0, "revocation not served within 1 s"
            time.sleep(0.02)
    out, _ = openssl_ocsp(ocsp_url, files, files["dev3"], "-no_nonce")
    assert _line_status(out, files["dev3"]) == "revoked"
    assert "Reason: superseded" in out


def _b64_with_all_escapes(d: IssuedCert) -> tuple[bytes, str]:
    """A request whose base64 contains '/', '+' and '=' (nonces vary the bytes)."""
    for i in range(5000):
        # the nonce length varies too, so that the length is not a multiple of 3 ('=')
        der = ocsp_request(d.cert, d.issuer, nonce=secrets.token_bytes(12 + i % 3))
        text = base64.b64encode(der).decode()
        if "/" in text and "+" in text and "=" in text:
            return der, text
    raise AssertionError("no request with every escape found")


def _curl(url: str, *extra: str) -> tuple[int, dict[str, str], bytes]:
    out = subprocess.run(["curl", "-s", "-D", "-", "--max-time", "20", *extra, url],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    head, _, body = out.stdout.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, body


def test_get_with_curl_and_cache_headers(ctx: ServiceContext, devices: list[IssuedCert],
                                         ocsp_url: str) -> None:
    d = devices[0]
    _der, text = _b64_with_all_escapes(d)
    encoded = urllib.parse.quote(text, safe="")
    assert "%2F" in encoded
    assert "%2B" in encoded
    assert "%3D" in encoded
    status, headers, body = _curl(f"{ocsp_url}/{encoded}")
    assert status == 200
    assert headers["content-type"] == OCSP_CT
    resp = check_signed_by_delegate(body, d.issuer)
    assert resp.certificate_status is cocsp.OCSPCertStatus.GOOD
    # RFC 5019 §6.2 caching headers
    assert re.fullmatch(r"max-age=\d+, public, no-transform, must-revalidate",
                        headers["cache-control"])
    assert int(headers["cache-control"].split("=")[1].split(",")[0]) > 0
    assert resp.next_update_utc is not None
    assert headers["expires"] == resp.next_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert headers["last-modified"] == resp.this_update_utc.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert headers["content-length"] == str(len(body))
    etag = headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]{32}"', etag)
    # the unencoded form ('/', '+', '=' as is) is the same request: the cached answer
    status, headers2, body2 = _curl(f"{ocsp_url}/{text}")
    assert status == 200
    assert body2 == body
    assert headers2["etag"] == etag
    # conditional GET and HEAD
    status, _, body3 = _curl(f"{ocsp_url}/{encoded}", "-H", f"If-None-Match: {etag}")
    assert status == 304
    assert body3 == b""
    status, headers4, _ = _curl(f"{ocsp_url}/{encoded}", "-I")
    assert status == 200
    assert headers4["content-type"] == OCSP_CT
    # SHA-256 CertID over GET, nonce-less
    der256 = ocsp_request(d.cert, d.issuer, hashes.SHA256())
    status, _, body = _curl(f"{ocsp_url}/{urllib.parse.quote(base64.b64encode(der256), safe='')}")
    assert check_signed_by_delegate(body, d.issuer).hash_algorithm.name == "sha256"


def _status(content: bytes) -> cocsp.OCSPResponseStatus:
    return cocsp.load_der_ocsp_response(content).response_status


def test_malformed_unauthorized_and_methods(ctx: ServiceContext, devices: list[IssuedCert],
                                            ocsp_url: str) -> None:
    d = devices[0]
    good = ocsp_request(d.cert, d.issuer)
    leaf, foreign = foreign_pair()
    bodies = {
        "garbage": b"GET / HTTP/1.1 definitely not DER",
        "truncated": good[:-3],
        "oversized": good + b"\x00" * 5000,
        "huge": b"\x30" * 200_000,
        "empty": b"",
    }
    with httpx.Client(timeout=10) as client:
        for name, body in bodies.items():
            r = client.post(ocsp_url, content=body,
                            headers={"content-type": "application/ocsp-request"})
            assert r.status_code == 200, name
            assert r.headers["content-type"] == OCSP_CT, name
            assert _status(r.content) is cocsp.OCSPResponseStatus.MALFORMED_REQUEST, name
        for path in ("", "/", "/%%%", "/AAAA", "/" + "A" * 9000):
            r = client.get(ocsp_url + path)
            assert r.status_code == 200, path
            assert _status(r.content) is cocsp.OCSPResponseStatus.MALFORMED_REQUEST, path
        r = client.post(ocsp_url, content=ocsp_request(leaf, foreign))
        assert r.status_code == 200
        assert _status(r.content) is cocsp.OCSPResponseStatus.UNAUTHORIZED
        r = client.put(ocsp_url, content=good)
        assert r.status_code == 405
        # the connection survives all of that; a good request still works (trailing slash too)
        r = client.post(ocsp_url + "/", content=good)
        assert check_signed_by_delegate(r.content, d.issuer).certificate_status \
            is cocsp.OCSPCertStatus.GOOD


def test_standalone_app(ctx: ServiceContext, devices: list[IssuedCert]) -> None:
    """The standalone OCSP app on the tuned protocol (TCP_NODELAY, one send per response)."""
    app = create_ocsp_app(ctx)
    d = devices[0]
    with serve(app, http=FastHttpToolsProtocol) as url, httpx.Client(timeout=10) as client:
        der = ocsp_request(d.cert, d.issuer)
        for _ in range(3):  # slow path, then the hot path, on one kept-alive connection
            r = client.post(f"{url}/ocsp", content=der)
            assert check_signed_by_delegate(r.content, d.issuer).certificate_status \
                is cocsp.OCSPCertStatus.GOOD
            assert r.headers["content-length"] == str(len(r.content))
        # a body in several chunks takes the general path
        r = client.post(f"{url}/ocsp", content=iter([der[:10], der[10:]]))
        assert check_signed_by_delegate(r.content, d.issuer).serial_number == d.cert.serial_number
        r = client.post(f"{url}/ocsp", content=b"\x00" * 10_000)
        assert _status(r.content) is cocsp.OCSPResponseStatus.MALFORMED_REQUEST
        r = client.get(f"{url}/ocsp/{base64.b64encode(der).decode()}")
        assert check_signed_by_delegate(r.content, d.issuer).serial_number == d.cert.serial_number
        # "Connection: close" is honoured after the (buffered) response went out
        r = client.post(f"{url}/ocsp", content=der, headers={"connection": "close"})
        assert r.headers.get("connection") == "close"
        assert check_signed_by_delegate(r.content, d.issuer).serial_number == d.cert.serial_number
        assert client.get(f"{url}/other").status_code == 404
        assert app.responder is not None
        assert app.responder.cache_size() == 1
    assert app.responder._closed  # lifespan shutdown stopped it


def test_fast_path_wrapping_the_operator_app(ctx: ServiceContext,
                                             devices: list[IssuedCert]) -> None:
    """``OcspFastPath(app)``: cached POSTs answered before the FastAPI stack, the rest (first
    request, GET, other API routes) passed through."""
    app = create_app(ctx)
    app.include_router(router)
    d = devices[0]
    der = ocsp_request(d.cert, d.issuer)
    with serve(OcspFastPath(app)) as url, httpx.Client(timeout=10) as client:
        for _ in range(3):
            r = client.post(f"{url}/ocsp", content=der)
            assert check_signed_by_delegate(r.content, d.issuer).certificate_status \
                is cocsp.OCSPCertStatus.GOOD
        responder: OcspResponder = app.state.ocsp_responder
        assert responder.stats["signed"] == 1  # the later answers came from the cache
        assert client.get(f"{url}/openapi.json").status_code == 200
        r = client.post(f"{url}/ocsp", content=b"junk")
        assert _status(r.content) is cocsp.OCSPResponseStatus.MALFORMED_REQUEST
    responder.close()
