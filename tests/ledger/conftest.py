"""Fixtures of the transparency-log tests: devices issued through the real services, the API
app with the ledger router included, and a live server for CLI tests."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi import FastAPI

from fleettrust.services import gateway as gw_svc
from fleettrust.services import hierarchy, issuance
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from tests.conftest import LiveServer, device_csr, manifest


@dataclass
class IssuedDevice:
    device_id: str
    serial: str
    key: ec.EllipticCurvePrivateKey
    cert_der: bytes


def issue(ctx: ServiceContext, who: Principal, batch: hierarchy.BatchCreated,
          n: int = 1) -> list[IssuedDevice]:
    csrs = [device_csr() for _ in range(n)]
    res = issuance.issue_devices(ctx, who, batch.batch.id, [
        issuance.IssueRequest(csr=csr, manifest=manifest()) for csr, _ in csrs])
    out = []
    for d, (_, key) in zip(res.devices, csrs, strict=True):
        cert = x509.load_pem_x509_certificate(d.certificate_pem.encode())
        out.append(IssuedDevice(d.device_id, d.serial_hex, key,
                                cert.public_bytes(serialization.Encoding.DER)))
    return out


def renew(ctx: ServiceContext, dev: IssuedDevice) -> IssuedDevice:
    """Renew through the device-channel service (old-key proof over the new CSR)."""
    new_key = ec.generate_private_key(ec.SECP256R1())
    csr_pem, _ = device_csr(new_key)
    csr_der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    proof = dev.key.sign(gw_svc.RENEW_CONTEXT + hashlib.sha256(csr_der).digest(),
                         ec.ECDSA(hashes.SHA256()))
    ident = gw_svc.identify_certificate(ctx, dev.cert_der)
    res = gw_svc.renew(ctx, ident, csr_pem, base64.b64encode(proof).decode(),
                       remote_addr="10.1.2.3")
    cert = x509.load_pem_x509_certificate(res["certificate_pem"].encode())
    return IssuedDevice(dev.device_id, res["serial"], new_key,
                        cert.public_bytes(serialization.Encoding.DER))


def ledger_app(ctx: ServiceContext) -> FastAPI:
    """The operator app; it already serves the ledger routes (``ledger_routes.router``)."""
    from fleettrust.api.app import create_app

    return create_app(ctx)


class LedgerServer(LiveServer):
    """The API app (with the ledger router) under uvicorn in a thread."""


@pytest.fixture
def ledger_server(ctx: ServiceContext) -> Iterator[LedgerServer]:
    with LedgerServer(ctx) as srv:
        yield srv
