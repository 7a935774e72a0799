"""Helpers to run the real device gateway (mutual TLS, uvicorn) on a free loopback port."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust import pki
from fleettrust.api.gateway_server import Gateway, build_gateway
from fleettrust.services import issuance
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.services.gateway import MANIFEST_CONTEXT
from tests.conftest import device_csr, manifest


def tls_client(root: Path, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """Client TLS context pinned to the fleet root, optionally with a client certificate."""
    context = ssl.create_default_context(cafile=str(root))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key else None)
    return context


class RunningGateway:
    def __init__(self, ctx: ServiceContext) -> None:
        self.gw: Gateway = build_gateway(ctx, port=0)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.gw.server.serve())

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        deadline = time.time() + 10
        while not self.gw.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.02)
        self.port = self.gw.server.bound_ports()[0]
        return self

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        self.gw.server.should_exit = True
        self.thread.join(timeout=15)
        self.loop.close()


@dataclass
class DeviceFiles:
    device_id: str
    serial: str
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path
    root_path: Path
    manifest: dict[str, Any]

    def client(self, gateway: RunningGateway, **kw: Any) -> httpx.Client:
        return httpx.Client(
            base_url=gateway.url,
            verify=tls_client(self.root_path, self.cert_path, self.key_path),
            timeout=10,
            **kw,
        )

    def checkin_body(
        self, *, sign_with: ec.EllipticCurvePrivateKey | None = None, boot_counter: int = 1
    ) -> dict[str, Any]:
        m = pki.normalize_manifest(self.manifest)
        sig = (sign_with or self.key).sign(
            MANIFEST_CONTEXT + pki.canonical_json(m), ec.ECDSA(hashes.SHA256())
        )
        return {
            "firmware_version": "1.0.0",
            "boot_counter": boot_counter,
            "uptime_s": 10,
            "agent_generation": 1,
            "manifest": self.manifest,
            "manifest_signature": base64.b64encode(sig).decode(),
            "health": {"status": "ok", "metrics": {"temp_c": 41.5}},
        }


def enroll(
    ctx: ServiceContext, principal: Principal, batch_id: str, tmp: Path, name: str = "dev"
) -> DeviceFiles:
    csr, key = device_csr()
    m = manifest()
    res = issuance.issue_devices(
        ctx, principal, batch_id, [issuance.IssueRequest(csr=csr, manifest=m)]
    )
    d = res.devices[0]
    tmp.mkdir(parents=True, exist_ok=True)
    cert_path = tmp / f"{name}.pem"
    cert_path.write_text(d.certificate_pem + "".join(res.chain_pem))
    key_path = tmp / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    root_path = tmp / "root.pem"
    root_path.write_text(res.root_pem)
    return DeviceFiles(d.device_id, d.serial_hex, key, cert_path, key_path, root_path, m)


def foreign_client_cert(
    tmp: Path, *, expired_from: x509.Certificate | None = None
) -> tuple[Path, Path]:
    """A self-made CA and client certificate the fleet never issued."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Evil CA")])
    _ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "d-evil")]))
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(ca_key, hashes.SHA256())
    )
    cp, kp = tmp / "foreign.pem", tmp / "foreign.key"
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cp, kp
