"""Test PKI for the agent tests: root -> fleet CA -> device / gateway server certificates.

Built with fleettrust's own profiles (``fleettrust.pki``) and in-memory FileSigners, so the
certificates look exactly like production ones, without a database or the ceremony.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import secrets
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from fleettrust import pki
from fleettrust.ids import new_device_id
from fleettrust.signing.filekeys import FileSigner

ORG = "fleettrust test fleet"


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _signer(label: str) -> FileSigner:
    key = ec.generate_private_key(ec.SECP256R1())
    return FileSigner(f"file:{label}-{secrets.token_hex(8)}", key)


class TestPKI:
    """A small fleet hierarchy. ``issue_device`` mimics the operator API's issuance."""

    __test__ = False  # not a pytest test class

    def __init__(self, now: dt.datetime | None = None, *, name: str = "Test") -> None:
        self.now = now or dt.datetime.now(dt.UTC)
        self.root_signer = _signer("root")
        self.root = pki.build_root_certificate(
            self.root_signer, common_name=f"{name} Root CA", organization=ORG, now=self.now,
            validity_days=3650)
        self.fleet_signer = _signer("fleet")
        self.fleet = pki.issue_ca_certificate(
            self.root_signer, self.root, self.fleet_signer.public_key(),
            common_name=f"{name} Fleet CA", organization=ORG, path_length=0,
            serial=pki.new_serial(), now=self.now, validity_days=3000, crl_url=None,
            ocsp_url=None, ca_issuers_url=None)
        self.profile = pki.DeviceProfile(self.fleet_signer, self.fleet, organization=ORG,
                                         ocsp_url=None, ca_issuers_url=None)

    @property
    def chain(self) -> list[x509.Certificate]:
        return [self.fleet]

    def issue_device(
        self,
        public_key: CertificatePublicKeyTypes,
        *,
        device_id: str | None = None,
        manifest: dict[str, Any] | None = None,
        validity_days: int = 365,
        now: dt.datetime | None = None,
    ) -> tuple[str, x509.Certificate]:
        device_id = device_id or new_device_id()
        normalized = pki.normalize_manifest(manifest or {"cpu_serial": device_id})
        cert = self.profile.issue(
            public_key, device_id=device_id, serial=pki.new_serial(), now=now or self.now,
            validity_days=validity_days, batch_id="bat_test", crl_url=None,
            manifest_sha256=pki.manifest_hash(normalized))
        return device_id, cert

    def issue_response(self, csr_pem: str, manifest: dict[str, Any], *,
                       validity_days: int = 365) -> dict[str, Any]:
        """What POST /v1/batches/{id}/devices answers for one {csr, manifest}."""
        csr = pki.load_csr(csr_pem.encode())
        device_id, cert = self.issue_device(csr.public_key(), manifest=manifest,
                                            validity_days=validity_days)
        return {
            "batch_id": "bat_test",
            "devices": [{"device_id": device_id, "serial": format(cert.serial_number, "x"),
                         "certificate_pem": pem(cert), "findings": []}],
            "chain_pem": [pem(self.fleet)],
            "root_pem": pem(self.root),
        }

    def server_certificate(self, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
        return pki.issue_server_certificate(
            self.fleet_signer, self.fleet, key.public_key(), dns_names=["gateway.fleet.test"],
            ip_addresses=[ipaddress.ip_address("127.0.0.1")], organization=ORG,
            serial=pki.new_serial(), now=self.now, validity_days=397, crl_url=None,
            ocsp_url=None, ca_issuers_url=None)

    def write_server_files(self, directory: Path) -> tuple[Path, Path]:
        """Server key + (leaf + fleet CA) chain files for the stub gateway."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.server_certificate(key)
        key_path, cert_path = directory / "gateway.key", directory / "gateway.pem"
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_path.write_text(pem(cert) + pem(self.fleet))
        return key_path, cert_path

    def write_root(self, path: Path) -> Path:
        path.write_text(pem(self.root))
        return path


def write_json(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc))
    return path
