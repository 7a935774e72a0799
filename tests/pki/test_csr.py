"""CSR loading (size, parse, signature) and subject-key admission."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import NameOID

from fleettrust.errors import PolicyError, ValidationError
from fleettrust.pki import check_key_allowed, load_csr, public_key_fingerprint

CN = "device-csr-test-0001"


def _csr(key: CertificateIssuerPrivateKeyTypes) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CN)])
    )
    algorithm = (
        None
        if isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)
        else (hashes.SHA256())
    )
    return builder.sign(key, algorithm)


@pytest.fixture(scope="module")
def p256_csr() -> x509.CertificateSigningRequest:
    return _csr(ec.generate_private_key(ec.SECP256R1()))


def _der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_bytes(serialization.Encoding.DER)


def _code(data: bytes | str, **kwargs: int) -> str:
    with pytest.raises(ValidationError) as exc:
        load_csr(data, **kwargs)
    return exc.value.code


def test_load_pem_der_and_text(p256_csr: x509.CertificateSigningRequest) -> None:
    pem = p256_csr.public_bytes(serialization.Encoding.PEM)
    assert load_csr(pem) == p256_csr
    assert load_csr(pem.decode()) == p256_csr
    assert load_csr(_der(p256_csr)) == p256_csr
    assert load_csr(b"\n\n" + pem + b"\n") == p256_csr


def test_tampered_signature(p256_csr: x509.CertificateSigningRequest) -> None:
    der = bytearray(_der(p256_csr))
    der[-1] ^= 0x01  # last octet of the ECDSA signature's s value
    with pytest.raises(ValidationError) as exc:
        load_csr(bytes(der))
    assert exc.value.code == "csr_bad_signature"
    assert exc.value.message == "CSR signature does not verify (tampered or not signed by its key)"


def test_tampered_subject(p256_csr: x509.CertificateSigningRequest) -> None:
    der = _der(p256_csr)
    assert der.count(CN.encode()) == 1
    tampered = der.replace(CN.encode(), CN.replace("0001", "0002").encode())
    assert x509.load_der_x509_csr(tampered).subject != p256_csr.subject  # still parses
    assert _code(tampered) == "csr_bad_signature"
    pem = x509.load_der_x509_csr(tampered).public_bytes(serialization.Encoding.PEM)
    assert _code(pem) == "csr_bad_signature"


def test_oversized(p256_csr: x509.CertificateSigningRequest) -> None:
    pem = p256_csr.public_bytes(serialization.Encoding.PEM)
    assert _code(pem + b"\n" * 16384) == "csr_too_large"
    assert _code("A" * 20000) == "csr_too_large"
    assert _code(pem, max_bytes=100) == "csr_too_large"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"   ",
        b"garbage",
        b"\x30\x03\x02\x01\x00",
        b"-----BEGIN CERTIFICATE REQUEST-----\nbm90IGEgY3Ny\n-----END CERTIFICATE REQUEST-----\n",
        "-----BEGIN CERTIFICATE REQUEST-----\nü\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_garbage(data: bytes | str) -> None:
    assert _code(data) == "csr_malformed"


def test_der_with_trailing_bytes(p256_csr: x509.CertificateSigningRequest) -> None:
    assert _code(_der(p256_csr) + b"\x00") == "csr_malformed"


def _refused(key: object) -> str:
    with pytest.raises(PolicyError) as exc:
        check_key_allowed(key)  # type: ignore[arg-type]
    assert exc.value.code == "key_not_allowed"
    return exc.value.message


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["p256", "p384", "ed25519", "rsa2048"],
)
def test_allowed_keys_via_csr(key: CertificateIssuerPrivateKeyTypes) -> None:
    csr = load_csr(_csr(key).public_bytes(serialization.Encoding.PEM))
    check_key_allowed(csr.public_key())


def test_weak_rsa_via_csr() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    csr = load_csr(_der(_csr(weak)))
    assert "RSA key of 1024 bits is too short" in _refused(csr.public_key())


def test_rsa_exponent_3() -> None:
    key = rsa.generate_private_key(public_exponent=3, key_size=2048)
    assert "public exponent 3 is not allowed" in _refused(key.public_key())


@pytest.mark.parametrize(
    ("curve", "label"),
    [(ec.SECP192R1(), "secp192r1"), (ec.SECP256K1(), "secp256k1"), (ec.SECP521R1(), "P-521")],
)
def test_other_curves_via_csr(curve: ec.EllipticCurve, label: str) -> None:
    csr = load_csr(_der(_csr(ec.generate_private_key(curve))))
    assert f"EC curve {label} is not allowed" in _refused(csr.public_key())


def test_dsa_via_csr() -> None:
    key = dsa.generate_private_key(key_size=2048)
    csr = load_csr(_der(_csr(key)))
    assert "DSA keys are not allowed" in _refused(csr.public_key())


def test_key_agreement_and_other_keys() -> None:
    assert "X25519 is a key-agreement-only key" in _refused(
        x25519.X25519PrivateKey.generate().public_key()
    )
    assert "X448" in _refused(x448.X448PrivateKey.generate().public_key())
    assert "Ed448 keys are not allowed" in _refused(ed448.Ed448PrivateKey.generate().public_key())
    assert "not allowed" in _refused("not a key")


def test_public_key_fingerprint_matches_openssl(tmp_path: pytest.TempPathFactory) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    spki = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public_key_fingerprint(key) == hashlib.sha256(spki).hexdigest()
    out = subprocess.run(
        ["openssl", "pkey", "-pubin", "-inform", "DER", "-outform", "DER"],
        input=spki,
        capture_output=True,
        check=True,
    ).stdout
    assert hashlib.sha256(out).hexdigest() == public_key_fingerprint(key)
