"""The device's own key: generation, CSRs, manifest signatures and renewal proofs.

What this module does:

* :class:`FileDeviceKey` — an EC P-256 key kept as an *unencrypted* PKCS#8 PEM file (mode 0600,
  written atomically) in the agent's private state directory (0700). Unencrypted because the
  agent must use it unattended for TLS; the protection is the file mode, or a PKCS#11 token.
* :class:`TokenDeviceKey` — an EC key generated *on* a PKCS#11 token through
  :class:`fleettrust.signing.pkcs11.Pkcs11KeyStore` (non-extractable). It signs CSRs, manifests
  and renewal proofs. It can NOT be used for the mTLS handshake: Python's :mod:`ssl` only loads
  private keys from files (no OpenSSL engine/provider hook), so ``fleettrust agent run`` refuses
  a token key with ``tls_key_unavailable`` instead of silently falling back to a file key (a
  second key would need a second certificate, and the gateway checks the manifest signature
  against the certificate the device presents). Token mode therefore covers enrollment only.
* :func:`build_csr` — PKCS#10 request signed by the device key (subject ``CN=<device id>`` when
  known; the device profile ignores the subject anyway).
* The two signed messages of docs/device-protocol.md, with signer and verifier:
  :func:`manifest_message` (``b"fleettrust-manifest-v1\\n" + canonical_json(manifest)``) and
  :func:`renew_proof_message` (``b"fleettrust-renew-v1\\n" + SHA-256(csr_der)``, the raw 32-byte
  digest). Signatures are standard base64 (RFC 4648 §4, padded) of a DER ECDSA signature with
  the curve's hash; :func:`verify_device_signature` also accepts Ed25519 and RSA PKCS#1 v1.5
  SHA-256 as the protocol allows.

What it does NOT do: no file layout decisions (``state`` names the files), no network.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Final, Literal, Protocol, runtime_checkable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from fleettrust.errors import KeyStoreError
from fleettrust.pki.manifest import Manifest, canonical_json

__all__ = [
    "MANIFEST_SIGNATURE_PREFIX",
    "RENEW_PROOF_PREFIX",
    "DeviceKey",
    "FileDeviceKey",
    "TokenDeviceKey",
    "atomic_write_bytes",
    "b64decode_strict",
    "build_csr",
    "fsync_directory",
    "make_renew_proof",
    "manifest_message",
    "public_key_matches",
    "renew_proof_message",
    "sign_manifest",
    "verify_device_signature",
    "verify_manifest_signature",
    "verify_renew_proof",
]

MANIFEST_SIGNATURE_PREFIX: Final = b"fleettrust-manifest-v1\n"
RENEW_PROOF_PREFIX: Final = b"fleettrust-renew-v1\n"
_CSR_PLACEHOLDER_CN: Final = "fleettrust-device"


# --- durable file writes (shared with ``state``) -------------------------------------------------


def fsync_directory(directory: Path) -> None:
    """fsync a directory so a rename/unlink inside it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Write ``data`` to ``path`` so that ``path`` is always either absent/old or complete/new.

    Temporary file in the same directory (``.tmp-*``), ``fchmod``, write, ``fsync``,
    ``os.replace``, then ``fsync`` of the directory. ``durable=False`` skips both fsyncs (used
    only for disposable simulated devices: atomic against a process kill, not a power cut).
    """
    directory = path.parent
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    if durable:
        fsync_directory(directory)


# --- keys -----------------------------------------------------------------------------------------


@runtime_checkable
class DeviceKey(Protocol):
    """The device's private key, wherever it lives."""

    @property
    def kind(self) -> Literal["file", "pkcs11"]: ...

    def public_key(self) -> ec.EllipticCurvePublicKey: ...

    def sign(self, data: bytes) -> bytes:
        """DER ECDSA signature over ``data`` with the curve's hash."""
        ...

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest: ...


def _hash_for(curve: ec.EllipticCurve) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(curve, ec.SECP256R1):
        return hashes.SHA256()
    if isinstance(curve, ec.SECP384R1):
        return hashes.SHA384()
    raise KeyStoreError(
        f"device key uses curve {curve.name}; only P-256 and P-384 are supported",
        code="unsupported_key",
    )


class FileDeviceKey:
    """An in-memory EC key loaded from (or to be written to) an unencrypted PKCS#8 file."""

    __slots__ = ("__key", "_hash", "path")

    def __init__(self, key: ec.EllipticCurvePrivateKey, path: Path | None = None) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyStoreError("device key must be an EC private key", code="unsupported_key")
        self._hash = _hash_for(key.curve)
        self.__key = key
        #: The file holding the key (None until written); what ``ssl`` loads for mTLS.
        self.path = path

    @property
    def kind(self) -> Literal["file"]:
        return "file"

    @classmethod
    def generate(cls) -> FileDeviceKey:
        """A fresh P-256 key, not yet written anywhere."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def load(cls, path: Path) -> FileDeviceKey:
        """Load the PEM at ``path`` (KeyStoreError ``key_not_found`` / ``unsupported_key``)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError as exc:
            raise KeyStoreError(
                f"device key file {path} does not exist", code="key_not_found"
            ) from exc
        except OSError as exc:
            raise KeyStoreError(
                f"cannot read device key file {path}: {exc.strerror}", code="key_io_error"
            ) from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyStoreError(
                f"device key file {path} is not an unencrypted PEM private key ({exc})",
                code="unsupported_key",
            ) from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise KeyStoreError(
                f"device key file {path} holds a {type(key).__name__}, not an EC key",
                code="unsupported_key",
            )
        return cls(key, path)

    def pem(self) -> bytes:
        return self.__key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, path: Path, *, durable: bool = True) -> None:
        """Write the key atomically with mode 0600 and remember ``path``."""
        atomic_write_bytes(path, self.pem(), mode=0o600, durable=durable)
        self.path = path

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.__key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self.__key.sign(data, ec.ECDSA(self._hash))

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        return builder.sign(self.__key, self._hash)

    def __repr__(self) -> str:
        return f"FileDeviceKey(path={str(self.path) if self.path else None!r})"

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("FileDeviceKey holds a private key and cannot be pickled")


class TokenDeviceKey:
    """A key on a PKCS#11 token (signs through :class:`~fleettrust.signing.pkcs11.Pkcs11Signer`).

    Not usable for the TLS handshake (see the module docstring).
    """

    def __init__(self, signer: _Pkcs11SignerLike) -> None:
        self._signer = signer

    @property
    def kind(self) -> Literal["pkcs11"]:
        return "pkcs11"

    @property
    def key_id(self) -> str:
        return self._signer.key_id

    def public_key(self) -> ec.EllipticCurvePublicKey:
        public = self._signer.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise KeyStoreError("token device key is not an EC key", code="unsupported_key")
        return public

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign_bytes(data)

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        return self._signer.sign_csr(builder)

    def __repr__(self) -> str:
        return f"TokenDeviceKey(key_id={self._signer.key_id!r})"


class _Pkcs11SignerLike(Protocol):
    @property
    def key_id(self) -> str: ...

    def public_key(self) -> object: ...

    def sign_bytes(self, data: bytes) -> bytes: ...

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest: ...


def public_key_matches(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    """True if both public keys have the same SubjectPublicKeyInfo."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    return a.public_bytes(serialization.Encoding.DER, fmt) == b.public_bytes(
        serialization.Encoding.DER, fmt
    )


# --- CSR and signed messages ----------------------------------------------------------------------


def build_csr(key: DeviceKey, device_id: str | None = None) -> x509.CertificateSigningRequest:
    """A CSR for ``key``; subject ``CN=<device_id>`` (or a placeholder before enrollment)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id or _CSR_PLACEHOLDER_CN)])
    return key.sign_csr(x509.CertificateSigningRequestBuilder().subject_name(name))


def manifest_message(manifest: Manifest) -> bytes:
    """The exact bytes a manifest signature covers (docs/device-protocol.md)."""
    return MANIFEST_SIGNATURE_PREFIX + canonical_json(manifest)


def sign_manifest(key: DeviceKey, manifest: Manifest) -> str:
    """``manifest_signature`` for a check-in: base64 of the device key's DER signature."""
    return base64.b64encode(key.sign(manifest_message(manifest))).decode("ascii")


def renew_proof_message(csr_der: bytes) -> bytes:
    """``b"fleettrust-renew-v1\\n" + SHA-256(csr_der)`` (raw 32-byte digest)."""
    return RENEW_PROOF_PREFIX + hashlib.sha256(csr_der).digest()


def make_renew_proof(current_key: DeviceKey, csr: x509.CertificateSigningRequest) -> str:
    """``old_key_proof`` for a renewal: the CURRENT key's signature binding the new CSR."""
    der = csr.public_bytes(serialization.Encoding.DER)
    return base64.b64encode(current_key.sign(renew_proof_message(der))).decode("ascii")


def b64decode_strict(text: str) -> bytes | None:
    """Decode standard padded base64; ``None`` if it is not exactly that."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None


def verify_device_signature(public_key: PublicKeyTypes, message: bytes, signature: bytes) -> bool:
    """Verify a device signature as docs/device-protocol.md specifies per key type."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, message, ec.ECDSA(_hash_for(public_key.curve)))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            return False
    except (InvalidSignature, KeyStoreError, ValueError):
        return False
    return True


def verify_manifest_signature(
    public_key: PublicKeyTypes, manifest: Manifest, signature_b64: str
) -> bool:
    """True if ``signature_b64`` is a valid manifest signature by ``public_key``."""
    raw = b64decode_strict(signature_b64)
    return raw is not None and verify_device_signature(public_key, manifest_message(manifest), raw)


def verify_renew_proof(public_key: PublicKeyTypes, csr_der: bytes, proof_b64: str) -> bool:
    """True if ``proof_b64`` is a valid ``old_key_proof`` by ``public_key`` for ``csr_der``."""
    raw = b64decode_strict(proof_b64)
    return raw is not None and verify_device_signature(
        public_key, renew_proof_message(csr_der), raw
    )
