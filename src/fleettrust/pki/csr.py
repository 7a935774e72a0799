"""Certificate signing requests and public-key admission.

:func:`load_csr` turns untrusted bytes (PEM or DER) into a parsed CSR whose self-signature has
been verified, refusing oversized input (``csr_too_large``), anything that does not parse as a
PKCS#10 request (``csr_malformed``) and requests whose signature does not verify
(``csr_bad_signature``) — all as :class:`~fleettrust.errors.ValidationError`.

:func:`check_key_allowed` is the single place that decides which subject public keys fleettrust
certifies (:class:`~fleettrust.errors.PolicyError` ``key_not_allowed`` otherwise):

* EC on P-256 (secp256r1) or P-384 (secp384r1);
* Ed25519;
* RSA with a modulus of at least 2048 bits and public exponent 65537.

Everything else is refused with a message naming what was found: short RSA keys or other
exponents, DSA, every other curve (secp192r1, secp256k1, P-521, brainpool, …), X25519/X448
(key agreement only), Ed448, finite-field DH and anything else.

:func:`public_key_fingerprint` is the hex SHA-256 of the DER SubjectPublicKeyInfo (the key
identity stored by the registry).

This module does not decide *who* may submit a CSR, and it does not read the CSR's subject or
requested extensions: profiles build certificates from fleettrust's own data, never from them.
"""

from __future__ import annotations

import hashlib
from typing import Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import (
    dsa,
    ec,
    ed448,
    ed25519,
    rsa,
    x448,
    x25519,
)
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from fleettrust.errors import PolicyError, ValidationError

CSR_MAX_BYTES: Final = 16384
RSA_MIN_BITS: Final = 2048
RSA_EXPONENT: Final = 65537
ALLOWED_CURVES: Final = frozenset({"secp256r1", "secp384r1"})
_CURVE_LABELS: Final = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def load_csr(
    data: bytes | str, *, max_bytes: int = CSR_MAX_BYTES
) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR and verify its self-signature.

    Raises ValidationError with code ``csr_too_large``, ``csr_malformed`` or
    ``csr_bad_signature``; PolicyError ``key_not_allowed`` if the key type is not even supported
    by the cryptography backend.
    """
    if isinstance(data, str):
        if len(data) > max_bytes:
            raise ValidationError(
                f"CSR is {len(data)} characters (at most {max_bytes} bytes)",
                code="csr_too_large",
            )
        try:
            raw = data.encode("ascii")
        except UnicodeEncodeError:
            raise ValidationError(
                "CSR text contains non-ASCII characters", code="csr_malformed"
            ) from None
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise ValidationError("CSR must be bytes or text", code="csr_malformed")
    if len(raw) > max_bytes:
        raise ValidationError(
            f"CSR is {len(raw)} bytes (at most {max_bytes})", code="csr_too_large"
        )
    if not raw.strip():
        raise ValidationError("CSR is empty", code="csr_malformed")

    is_pem = b"-----BEGIN" in raw
    try:
        csr = x509.load_pem_x509_csr(raw) if is_pem else x509.load_der_x509_csr(raw)
        # cryptography parses some parts lazily: force them so errors surface here.
        _ = csr.subject
        _ = csr.extensions
        _ = csr.signature_hash_algorithm
    except UnsupportedAlgorithm as exc:
        raise ValidationError(
            f"CSR uses an unsupported signature algorithm: {exc}", code="csr_malformed"
        ) from None
    except (ValueError, TypeError) as exc:
        kind = "PEM" if is_pem else "DER"
        raise ValidationError(
            f"not a parseable PKCS#10 CSR ({kind}): {exc}", code="csr_malformed"
        ) from None

    try:
        csr.public_key()
    except (UnsupportedAlgorithm, ValueError) as exc:
        raise PolicyError(
            f"CSR public key algorithm is not supported: {exc}", code="key_not_allowed"
        ) from None

    try:
        valid = csr.is_signature_valid
    except (UnsupportedAlgorithm, ValueError, TypeError):
        valid = False
    if not valid:
        raise ValidationError(
            "CSR signature does not verify (tampered or not signed by its key)",
            code="csr_bad_signature",
        )
    return csr


def _refuse(message: str) -> PolicyError:
    return PolicyError(message, code="key_not_allowed")


_ALLOWED_TEXT: Final = "allowed: EC P-256, EC P-384, Ed25519, RSA >= 2048 bits with exponent 65537"


def check_key_allowed(public_key: PublicKeyTypes) -> None:
    """Raise PolicyError ``key_not_allowed`` unless fleettrust certifies this key type."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        name = public_key.curve.name
        if name in ALLOWED_CURVES:
            return
        label = _CURVE_LABELS.get(name, name)
        raise _refuse(f"EC curve {label} is not allowed ({_ALLOWED_TEXT})")
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        exponent = public_key.public_numbers().e
        if bits < RSA_MIN_BITS:
            raise _refuse(f"RSA key of {bits} bits is too short ({_ALLOWED_TEXT})")
        if exponent != RSA_EXPONENT:
            raise _refuse(f"RSA public exponent {exponent} is not allowed ({_ALLOWED_TEXT})")
        return
    if isinstance(public_key, dsa.DSAPublicKey):
        raise _refuse(f"DSA keys are not allowed ({_ALLOWED_TEXT})")
    if isinstance(public_key, x25519.X25519PublicKey | x448.X448PublicKey):
        kind = "X25519" if isinstance(public_key, x25519.X25519PublicKey) else "X448"
        raise _refuse(
            f"{kind} is a key-agreement-only key and cannot be certified ({_ALLOWED_TEXT})"
        )
    if isinstance(public_key, ed448.Ed448PublicKey):
        raise _refuse(f"Ed448 keys are not allowed ({_ALLOWED_TEXT})")
    raise _refuse(f"key type {type(public_key).__name__} is not allowed ({_ALLOWED_TEXT})")


def public_key_fingerprint(key: PublicKeyTypes) -> str:
    """Lower-case hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


__all__ = [
    "ALLOWED_CURVES",
    "CSR_MAX_BYTES",
    "check_key_allowed",
    "load_csr",
    "public_key_fingerprint",
]
