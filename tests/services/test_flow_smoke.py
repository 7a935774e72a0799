"""End-to-end through the services: ceremony, factory, batch, issuance, openssl verify."""

from __future__ import annotations

import subprocess
from pathlib import Path

from cryptography import x509

from fleettrust.services import issuance
from fleettrust.services.context import ServiceContext
from tests.conftest import Hierarchy, device_csr, manifest


def test_issue_and_openssl_verify(ctx: ServiceContext, fleet: Hierarchy, factory, factory_principal,
                                  batch, tmp_path: Path) -> None:
    csr, _ = device_csr()
    res = issuance.issue_devices(ctx, factory_principal, batch.batch.id,
                                 [issuance.IssueRequest(csr=csr, manifest=manifest())])
    d = res.devices[0]
    (tmp_path / "root.pem").write_text(res.root_pem)
    (tmp_path / "chain.pem").write_text("".join(res.chain_pem))
    (tmp_path / "dev.pem").write_text(d.certificate_pem)
    out = subprocess.run(["openssl", "verify", "-CAfile", tmp_path / "root.pem", "-untrusted",
                          tmp_path / "chain.pem", "-purpose", "sslclient", tmp_path / "dev.pem"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    cert = x509.load_pem_x509_certificate(d.certificate_pem.encode())
    assert cert.serial_number.bit_length() >= 64
