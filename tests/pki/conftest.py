"""Fixtures for the pure PKI tests: an in-memory signer and a complete certificate hierarchy.

``hierarchy`` builds root -> fleet CA -> factory CA (pathLen 1) -> batch CA (pathLen 0) ->
devices, plus a second factory CA with pathLen 0 issuing devices directly, a device-gateway
TLS server certificate and an OCSP responder certificate, all at the fixed instant ``NOW``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
)

from fleettrust.pki import (
    DeviceProfile,
    build_root_certificate,
    issue_ca_certificate,
    issue_ocsp_responder_certificate,
    issue_server_certificate,
    manifest_hash,
    new_serial,
    normalize_manifest,
)
from fleettrust.signing.base import Signer, SignerAlgorithm

NOW = dt.datetime(2025, 6, 2, 9, 30, 0, tzinfo=dt.UTC)
ORG = "Example Fleet GmbH"
BASE_URL = "http://pki.fleet.example"
SAMPLE_MANIFEST = {
    "cpu_serial": "0000000012345678",
    "mac_addresses": ["DC:A6:32:01:02:03", "dc-a6-32-01-02-04"],
    "imei": "490154203237518",
    "wlan_module_id": "WLAN-7788",
    "lte_module_id": "EG25-000123",
    "other": {"tpm_ek_serial": "0x1234"},
}


class InMemorySigner:
    """Test-only Signer wrapping an in-memory EC private key (SHA-256 for P-256, else SHA-384)."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, key_id: str = "mem:test") -> None:
        self._key = key
        self._key_id = key_id
        self._hash: hashes.SHA256 | hashes.SHA384 = (
            hashes.SHA256() if key.curve.name == "secp256r1" else hashes.SHA384()
        )

    @classmethod
    def generate(
        cls, algorithm: SignerAlgorithm = SignerAlgorithm.EC_P256, label: str = "test"
    ) -> InMemorySigner:
        curve: ec.EllipticCurve = (
            ec.SECP256R1() if algorithm is SignerAlgorithm.EC_P256 else ec.SECP384R1()
        )
        return cls(ec.generate_private_key(curve), key_id=f"mem:{label}")

    @property
    def private_key(self) -> ec.EllipticCurvePrivateKey:
        """Test-only escape hatch (e.g. for cryptography's OCSP builder); real signers have none."""
        return self._key

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def algorithm(self) -> SignerAlgorithm:
        if self._key.curve.name == "secp256r1":
            return SignerAlgorithm.EC_P256
        return SignerAlgorithm.EC_P384

    def public_key(self) -> CertificateIssuerPublicKeyTypes:
        return self._key.public_key()

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self._key, self._hash)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return builder.sign(self._key, self._hash)

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        return builder.sign(self._key, self._hash)

    def sign_bytes(self, data: bytes) -> bytes:
        return self._key.sign(data, ec.ECDSA(self._hash))


def device_key(kind: str) -> CertificatePublicKeyTypes:
    """A fresh device public key: 'p256', 'p384', 'ed25519' or 'rsa2048'."""
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1()).public_key()
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1()).public_key()
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate().public_key()
    if kind == "rsa2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    raise ValueError(kind)


DEVICE_KEY_KINDS = ("p256", "p384", "ed25519", "rsa2048")


@dataclass
class Hierarchy:
    now: dt.datetime
    root_signer: InMemorySigner
    root: x509.Certificate
    fleet_signer: InMemorySigner
    fleet: x509.Certificate
    factory_signer: InMemorySigner  # pathLen 1, has a batch CA below it
    factory: x509.Certificate
    batch_signer: InMemorySigner  # pathLen 0
    batch: x509.Certificate
    factory0_signer: InMemorySigner  # pathLen 0, issues devices directly
    factory0: x509.Certificate
    batch_profile: DeviceProfile
    factory0_profile: DeviceProfile
    server: x509.Certificate
    ocsp_responder: x509.Certificate
    manifest_sha256: bytes
    #: device certificates by key kind, issued by the batch CA and by factory0
    batch_devices: dict[str, x509.Certificate] = field(default_factory=dict)
    factory0_devices: dict[str, x509.Certificate] = field(default_factory=dict)

    def issue_device(
        self,
        profile: DeviceProfile,
        key: CertificatePublicKeyTypes,
        device_id: str,
        *,
        crl_url: str | None = f"{BASE_URL}/crl/batch.crl",
    ) -> x509.Certificate:
        return profile.issue(
            key,
            device_id=device_id,
            serial=new_serial(),
            now=self.now,
            validity_days=3650,
            batch_id="B-2025-06-001",
            manifest_sha256=self.manifest_sha256,
            crl_url=crl_url,
        )


def _ca(
    issuer_signer: Signer,
    issuer_cert: x509.Certificate,
    subject: InMemorySigner,
    name: str,
    path_length: int | None,
    days: int,
) -> x509.Certificate:
    return issue_ca_certificate(
        issuer_signer,
        issuer_cert,
        subject.public_key(),
        common_name=name,
        organization=ORG,
        path_length=path_length,
        serial=new_serial(),
        now=NOW,
        validity_days=days,
        crl_url=f"{BASE_URL}/crl/{name.replace(' ', '-').lower()}.crl",
        ocsp_url=f"{BASE_URL}/ocsp",
        ca_issuers_url=f"{BASE_URL}/ca/{name.replace(' ', '-').lower()}.der",
    )


def build_hierarchy() -> Hierarchy:
    root_signer = InMemorySigner.generate(SignerAlgorithm.EC_P384, "root")
    root = build_root_certificate(
        root_signer, common_name="Example Fleet Root CA", organization=ORG, now=NOW
    )
    fleet_signer = InMemorySigner.generate(SignerAlgorithm.EC_P384, "fleet")
    fleet = _ca(root_signer, root, fleet_signer, "Example Fleet CA", 2, 3650)
    factory_signer = InMemorySigner.generate(SignerAlgorithm.EC_P256, "factory")
    factory = _ca(fleet_signer, fleet, factory_signer, "Factory Leipzig", 1, 1825)
    batch_signer = InMemorySigner.generate(SignerAlgorithm.EC_P256, "batch")
    batch = _ca(factory_signer, factory, batch_signer, "Batch B-2025-06-001", 0, 1000)
    factory0_signer = InMemorySigner.generate(SignerAlgorithm.EC_P256, "factory0")
    factory0 = _ca(fleet_signer, fleet, factory0_signer, "Factory Penang", 0, 1825)

    server = issue_server_certificate(
        fleet_signer,
        fleet,
        device_key("p256"),
        dns_names=["gateway.fleet.example", "GW2.fleet.example"],
        ip_addresses=[ipaddress.ip_address("192.0.2.10"), ipaddress.ip_address("2001:db8::10")],
        organization=ORG,
        serial=new_serial(),
        now=NOW,
        validity_days=90,
        crl_url=f"{BASE_URL}/crl/example-fleet-ca.crl",
        ocsp_url=f"{BASE_URL}/ocsp",
        ca_issuers_url=f"{BASE_URL}/ca/example-fleet-ca.der",
    )
    ocsp_responder = issue_ocsp_responder_certificate(
        fleet_signer,
        fleet,
        device_key("p256"),
        common_name="Example Fleet CA OCSP Responder",
        organization=ORG,
        serial=new_serial(),
        now=NOW,
    )
    batch_profile = DeviceProfile(
        batch_signer,
        batch,
        organization=ORG,
        ocsp_url=f"{BASE_URL}/ocsp",
        ca_issuers_url=f"{BASE_URL}/ca/batch-b-2025-06-001.der",
    )
    factory0_profile = DeviceProfile(
        factory0_signer,
        factory0,
        organization=ORG,
        ocsp_url=f"{BASE_URL}/ocsp",
        ca_issuers_url=f"{BASE_URL}/ca/factory-penang.der",
    )
    h = Hierarchy(
        now=NOW,
        root_signer=root_signer,
        root=root,
        fleet_signer=fleet_signer,
        fleet=fleet,
        factory_signer=factory_signer,
        factory=factory,
        batch_signer=batch_signer,
        batch=batch,
        factory0_signer=factory0_signer,
        factory0=factory0,
        batch_profile=batch_profile,
        factory0_profile=factory0_profile,
        server=server,
        ocsp_responder=ocsp_responder,
        manifest_sha256=manifest_hash(normalize_manifest(SAMPLE_MANIFEST)),
    )
    for kind in DEVICE_KEY_KINDS:
        h.batch_devices[kind] = h.issue_device(batch_profile, device_key(kind), f"dev-b-{kind}")
        h.factory0_devices[kind] = h.issue_device(
            factory0_profile, device_key(kind), f"dev-f0-{kind}"
        )
    return h


@pytest.fixture(scope="session")
def hierarchy() -> Hierarchy:
    return build_hierarchy()


@pytest.fixture
def make_signer() -> Callable[..., InMemorySigner]:
    return InMemorySigner.generate
