"""The Signer and KeyStore protocols every signing backend implements.

A :class:`Signer` signs X.509 objects (certificates, CRLs, CSRs) and raw bytes with one private
key it never exposes. A :class:`KeyStore` creates and finds signers by a stable ``key_id``
(a string stored in the database; it never contains key material).

This module does not touch files, tokens or the database.
"""

from __future__ import annotations

import enum
from typing import Protocol, runtime_checkable

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPublicKeyTypes


class SignerAlgorithm(enum.StrEnum):
    """Key algorithms fleettrust creates for CAs (ECDSA only; hash follows the curve)."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"


@runtime_checkable
class Signer(Protocol):
    """One private key that can sign; the key itself never leaves the backend."""

    @property
    def key_id(self) -> str:
        """Stable identifier of the key inside its store."""
        ...

    @property
    def algorithm(self) -> SignerAlgorithm: ...

    def public_key(self) -> CertificateIssuerPublicKeyTypes: ...

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a fully populated builder (its public key, names, extensions already set)."""
        ...

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList: ...

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest: ...

    def sign_bytes(self, data: bytes) -> bytes:
        """DER-encoded ECDSA signature over ``data`` with the curve's hash (SHA-256/384)."""
        ...


class KeyStore(Protocol):
    """Creates and loads signers. Implementations must be safe to share between threads."""

    def generate(self, label: str, algorithm: SignerAlgorithm = SignerAlgorithm.EC_P256) -> Signer:
        """Create a new key pair; ``label`` is a human hint that becomes part of the key id."""
        ...

    def load(self, key_id: str) -> Signer:
        """Return the signer for ``key_id``; raise ``KeyStoreError`` if it is unknown."""
        ...

    def delete(self, key_id: str) -> None:
        """Destroy a key (used to roll back a failed operation that created it)."""
        ...
