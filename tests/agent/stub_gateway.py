"""PROTOCOL STUB of the device gateway — for the agent's own tests only.

This is NOT the fleettrust gateway (the lead builds that, with its own end-to-end tests). It is
a small ``http.server`` + ``ssl`` HTTPS server in a thread that implements just enough of
docs/device-protocol.md to exercise the agent's client logic over real mutual TLS:

* TLS: server certificate from the test PKI's fleet CA (chain sent), ``CERT_OPTIONAL`` client
  certificates verified against the test root; session tickets on (Python's default);
* ``POST /v1/device/checkin``: 401 ``client_certificate_required`` without a certificate;
  403 ``certificate_unknown`` / ``device_suspended`` / ``device_decommissioned`` …  from a
  serial -> status table; 403 ``manifest_signature_invalid`` when the manifest signature does
  not verify with the certificate's key; otherwise 200 with ``next_checkin_s`` and ``renew``;
* ``POST /v1/device/renew``: checks the CSR and ``old_key_proof``, issues a new certificate for
  the same device from the test PKI (``key_reused`` for an already certified key);
* scripted failures: ``fail_next`` (a queue of HTTP statuses to answer instead, e.g. 503) and
  ``drop_next`` (close the connection without answering).

Everything it receives is recorded in ``requests`` for assertions.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleettrust import pki
from fleettrust.agent.identity import verify_manifest_signature, verify_renew_proof
from tests.agent.pki_helpers import TestPKI, pem


@dataclass
class Recorded:
    path: str
    body: dict[str, Any]
    serial: int | None
    session_reused: bool
    connection: int


@dataclass
class StubState:
    pki: TestPKI
    devices: dict[int, tuple[str, str]] = field(default_factory=dict)  # serial -> (id, status)
    key_fps: set[str] = field(default_factory=set)
    next_checkin_s: float = 300
    renew: bool = False
    renew_validity_days: int = 365
    fail_next: deque[int] = field(default_factory=deque)
    drop_next: int = 0
    requests: list[Recorded] = field(default_factory=list)
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, cert: x509.Certificate, device_id: str, status: str = "active") -> None:
        with self.lock:
            self.devices[cert.serial_number] = (device_id, status)
            self.key_fps.add(pki.public_key_fingerprint(cert.public_key()))

    def set_status(self, device_id: str, status: str) -> None:
        with self.lock:
            for serial, (did, _) in list(self.devices.items()):
                if did == device_id:
                    self.devices[serial] = (did, status)


_REFUSED = {"suspended": "device_suspended", "decommissioned": "device_decommissioned",
            "revoked": "device_revoked"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.stub.lock:
            self.server.stub.connections += 1
            self.conn_no = self.server.stub.connections

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        ctype = "application/json" if status == 200 else "application/problem+json"
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        if status == 503:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(body)

    def _problem(self, status: int, code: str, detail: str) -> None:
        self._send(status, {"type": f"urn:fleettrust:problem:{code}", "title": code,
                            "status": status, "detail": detail, "code": code})

    def do_GET(self) -> None:
        """The revocation feed (docs/device-protocol.md): always an empty, current page."""
        if self.path.startswith("/v1/revocations"):
            self._send(200, {"format": "v1", "since": 0, "next": 0, "head": 0, "more": False,
                             "snapshot_required": False, "events": []})
            return
        self._problem(404, "no_such_route", self.path)

    def do_POST(self) -> None:
        stub = self.server.stub
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        sock = self.connection
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(der) if der else None
        with stub.lock:
            stub.requests.append(Recorded(self.path, body, cert.serial_number if cert else None,
                                          sock.session_reused, self.conn_no))
            if stub.drop_next > 0:
                stub.drop_next -= 1
                self.close_connection = True
                sock.close()
                return
            failure = stub.fail_next.popleft() if stub.fail_next else None
        if failure is not None:
            self._problem(failure, "unavailable" if failure >= 500 else "scripted",
                          "scripted failure")
            return
        if cert is None:
            self._problem(401, "client_certificate_required", "no client certificate")
            return
        with stub.lock:
            known = stub.devices.get(cert.serial_number)
        if known is None:
            self._problem(403, "certificate_unknown", "certificate not issued by fleettrust")
            return
        device_id, status = known
        if status in _REFUSED:
            self._problem(403, _REFUSED[status], f"device {device_id} is {status}")
            return
        if self.path == "/v1/device/checkin":
            self._checkin(cert, device_id, status, body)
        elif self.path == "/v1/device/renew":
            self._renew(cert, device_id, body)
        else:
            self._problem(404, "not_found", self.path)

    def _checkin(self, cert: x509.Certificate, device_id: str, status: str,
                 body: dict[str, Any]) -> None:
        stub = self.server.stub
        try:
            manifest = pki.normalize_manifest(body["manifest"])
            ok = verify_manifest_signature(cert.public_key(), manifest,
                                           body["manifest_signature"])
        except Exception:
            ok = False
        if not ok:
            self._problem(403, "manifest_signature_invalid", "manifest signature invalid")
            return
        self._send(200, {"device_id": device_id, "status": status,
                         "server_time": "2026-11-24T14:00:00Z",
                         "next_checkin_s": stub.next_checkin_s, "renew": stub.renew,
                         "actions": []})

    def _renew(self, cert: x509.Certificate, device_id: str, body: dict[str, Any]) -> None:
        stub = self.server.stub
        try:
            csr = pki.load_csr(body["csr"].encode())
        except Exception as exc:
            self._problem(422, "csr_malformed", str(exc))
            return
        der = csr.public_bytes(serialization.Encoding.DER)
        if not verify_renew_proof(cert.public_key(), der, body.get("old_key_proof", "")):
            self._problem(403, "old_key_proof_invalid", "old_key_proof does not verify")
            return
        fp = pki.public_key_fingerprint(csr.public_key())
        with stub.lock:
            if fp in stub.key_fps:
                self._problem(409, "key_reused", "key already certified")
                return
        _, new = stub.pki.issue_device(csr.public_key(), device_id=device_id,
                                       validity_days=stub.renew_validity_days)
        stub.register(new, device_id)
        with stub.lock:
            stub.renew = False
        self._send(200, {"device_id": device_id, "serial": format(new.serial_number, "x"),
                         "certificate_pem": pem(new), "chain_pem": [pem(stub.pki.fleet)],
                         "root_pem": pem(stub.pki.root)})


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    stub: StubState

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet TLS failures
        pass


class StubGateway:
    """``with StubGateway(pki, tmp_path) as gw: gw.url`` — see the module docstring."""

    def __init__(self, test_pki: TestPKI, workdir: Path) -> None:
        key_path, cert_path = test_pki.write_server_files(workdir)
        root_path = test_pki.write_root(workdir / "stub-root.pem")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_path, key_path)
        context.load_verify_locations(cafile=str(root_path))
        context.verify_mode = ssl.CERT_OPTIONAL
        self.state = StubState(pki=test_pki)
        self.httpd = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=True)
        self.httpd.stub = self.state
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.url = f"https://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> StubGateway:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def checkins(self) -> list[Recorded]:
        with self.state.lock:
            return [r for r in self.state.requests if r.path == "/v1/device/checkin"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class _OperatorHandler(BaseHTTPRequestHandler):
    """PROTOCOL STUB of the operator API's issuance endpoints (single and bulk)."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _OperatorServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, doc: dict[str, Any]) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        op = self.server.operator
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        if self.headers.get("Authorization") != f"Bearer {op.token}":
            self._send(401, {"code": "unauthenticated", "detail": "bad token", "status": 401})
            return
        parts = self.path.strip("/").split("/")  # v1 batches {id} devices [bulk]
        if parts[:2] != ["v1", "batches"] or len(parts) < 4 or parts[3] != "devices":
            self._send(404, {"code": "not_found", "detail": self.path, "status": 404})
            return
        items = body["items"] if parts[-1] == "bulk" else [body]
        with op.lock:
            op.received.append((self.path, items))
        devices = []
        for item in items:
            doc = op.pki.issue_response(item["csr"], item["manifest"],
                                        validity_days=op.validity_days)
            entry = doc["devices"][0]
            devices.append(entry)
            if op.gateway is not None:
                op.gateway.register(
                    x509.load_pem_x509_certificate(entry["certificate_pem"].encode()),
                    entry["device_id"])
        self._send(201, {"batch_id": parts[2], "devices": devices,
                         "chain_pem": [pem(op.pki.fleet)], "root_pem": pem(op.pki.root)})


class _OperatorServer(ThreadingHTTPServer):
    daemon_threads = True
    operator: StubOperatorAPI


class StubOperatorAPI:
    """Plain-HTTP loopback stub of ``POST /v1/batches/{id}/devices[/bulk]``; issued devices
    are registered with ``gateway`` (a StubState) when given."""

    def __init__(self, test_pki: TestPKI, token: str, gateway: StubState | None = None,
                 validity_days: int = 365) -> None:
        self.pki = test_pki
        self.token = token
        self.gateway = gateway
        self.validity_days = validity_days
        self.lock = threading.Lock()
        self.received: list[tuple[str, list[dict[str, Any]]]] = []
        self.httpd = _OperatorServer(("127.0.0.1", 0), _OperatorHandler)
        self.httpd.operator = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> StubOperatorAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)
