"""Helpers of the revocation-core tests: issue real devices, read state, run openssl."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import func, select

from fleettrust.revocation.models import RevocationOperation
from fleettrust.services import issuance
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import (
    AuditEvent,
    Certificate,
    Device,
    Revocation,
    StatusChange,
)
from tests.conftest import device_csr, free_port, manifest


@dataclass
class Issued:
    device_id: str
    serial_hex: str
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    chain: list[x509.Certificate]  # issuing CA first, root excluded
    root: x509.Certificate


def issue(ctx: ServiceContext, principal: Principal, batch_id: str, n: int = 1) -> list[Issued]:
    reqs, keys = [], []
    for _ in range(n):
        csr, key = device_csr()
        reqs.append(issuance.IssueRequest(csr=csr, manifest=manifest()))
        keys.append(key)
    res = issuance.issue_devices(ctx, principal, batch_id, reqs)
    chain = [x509.load_pem_x509_certificate(p.encode()) for p in res.chain_pem]
    root = x509.load_pem_x509_certificate(res.root_pem.encode())
    return [Issued(d.device_id, d.serial_hex,
                   x509.load_pem_x509_certificate(d.certificate_pem.encode()), k, chain, root)
            for d, k in zip(res.devices, keys, strict=True)]


def cert_status(ctx: ServiceContext, serial_hex: str) -> str:
    with ctx.sessions() as s:
        return str(s.scalar(select(Certificate.status).where(
            Certificate.serial_hex == serial_hex)))


def device_status(ctx: ServiceContext, device_id: str) -> str:
    with ctx.sessions() as s:
        d = s.get(Device, device_id)
        assert d is not None
        return d.status


def counts(ctx: ServiceContext) -> dict[str, int]:
    """Rows of every table a revocation writes (to prove that a refusal wrote nothing)."""
    with ctx.sessions() as s:
        return {
            "revocations": int(s.scalar(select(func.count()).select_from(Revocation)) or 0),
            "operations": int(s.scalar(select(func.count()).select_from(RevocationOperation))
                              or 0),
            "status_changes": int(s.scalar(select(func.count()).select_from(StatusChange))
                                  or 0),
            "audit": int(s.scalar(select(func.count()).select_from(AuditEvent)) or 0),
            "revoked_certs": int(s.scalar(select(func.count()).select_from(Certificate)
                                          .where(Certificate.status != "good")) or 0),
        }


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def crl_pem(der: bytes) -> bytes:
    return x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def openssl(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True,
                          timeout=30, check=False)


class AppServer:
    """A FastAPI app under uvicorn in a thread on a free loopback port, with an httpx client
    (``fastapi.testclient`` warns with this Starlette, and warnings are errors here)."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> httpx.Client:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self.client

    def __exit__(self, *exc: object) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=10)


def crl_app(ctx: ServiceContext) -> Any:
    """The operator API with the CRL and revocation routers (as the lead wires them)."""
    from fleettrust.api.app import create_app
    from fleettrust.api.crl_routes import admin_router, public_router
    from fleettrust.api.revocation_routes import router
    from fleettrust.revocation.crl_publisher import CrlPublisher

    app = create_app(ctx)
    app.include_router(public_router)
    app.include_router(admin_router)
    app.include_router(router)
    app.state.crl_publisher = CrlPublisher(ctx, recheck_s=0.0)
    return app
