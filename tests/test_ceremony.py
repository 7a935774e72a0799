"""The offline root ceremony: init-root (encrypted file key or PKCS#11 token) and sign_ca_csr.

Real components only: keys on disk, a SoftHSM2 token, openssl for the fingerprint.
"""

from __future__ import annotations

import datetime as dt
import json
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust import ceremony, pki
from fleettrust.errors import ConflictError, FleetTrustError, KeyStoreError, ValidationError
from fleettrust.signing.base import SignerAlgorithm
from fleettrust.signing.filekeys import FileKeyStore
from tests.softhsm import TEST_USER_PIN, make_softhsm_token, softhsm_available

PASS = b"ceremony passphrase 42"
def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ca_csr(tmp_path: Path, cn: str = "Fleet CA") -> tuple[bytes, ec.EllipticCurvePublicKey]:
    """A CA CSR made the way the server makes the fleet CA's (key in a file key store)."""
    signer = FileKeyStore(tmp_path / "server-keys", b"server store").generate("fleet-ca")
    csr = pki.build_ca_csr(signer, common_name=cn, organization="fleettrust fleet")
    return csr.public_bytes(serialization.Encoding.PEM), signer.public_key()


def tamper(csr_pem: bytes) -> bytes:
    """Change one character of the subject: the CSR still parses, its signature no longer fits."""
    der = x509.load_pem_x509_csr(csr_pem).public_bytes(serialization.Encoding.DER)
    assert der.count(b"Fleet CA") == 1
    bad = x509.load_der_x509_csr(der.replace(b"Fleet CA", b"Fleet CB"))
    return bad.public_bytes(serialization.Encoding.PEM)


def issued_lines(root_dir: Path) -> list[dict[str, str]]:
    path = root_dir / ceremony.ISSUED_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def code_of(exc: pytest.ExceptionInfo[FleetTrustError]) -> str:
    return exc.value.code


# --- file-backed root --------------------------------------------------------------------------


def test_init_root_file_key_encrypted_private_and_fingerprint(tmp_path: Path) -> None:
    root_dir = tmp_path / "root"
    info = ceremony.init_root(root_dir, passphrase=PASS, now=now())

    key_file = root_dir / ceremony.ROOT_KEY
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(root_dir.stat().st_mode) == 0o700
    pem = key_file.read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = serialization.load_pem_private_key(pem, password=PASS)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp384r1"
    assert key.public_key() == info.certificate.public_key()
    with pytest.raises(ValueError, match=r"(?i)password|decrypt"):
        serialization.load_pem_private_key(pem, password=b"wrong passphrase!")
    with pytest.raises(TypeError):  # encrypted: unusable without a passphrase
        serialization.load_pem_private_key(pem, password=None)

    # The root: self-signed CA, keyCertSign + cRLSign only.
    cert = info.certificate
    assert cert.subject == cert.issuer
    cert.verify_directly_issued_by(cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days > 20 * 365

    # The printed fingerprint is openssl's SHA-256 fingerprint of root.pem.
    out = subprocess.run(
        ["openssl", "x509", "-in", root_dir / ceremony.ROOT_CERT, "-noout", "-fingerprint",
         "-sha256"], capture_output=True, text=True, check=True).stdout
    assert out.strip().split("=", 1)[1] == info.fingerprint
    meta = json.loads((root_dir / ceremony.ROOT_META).read_text())
    assert meta["fingerprint_sha256"] == info.fingerprint
    assert meta["key_backend"] == "file"
    # No file of the root directory holds the passphrase.
    for f in root_dir.iterdir():
        assert PASS not in f.read_bytes()

    # Loading with the wrong passphrase is refused precisely.
    with pytest.raises(KeyStoreError) as exc:
        ceremony.load_root(root_dir, passphrase=b"not the passphrase")
    assert code_of(exc) == "wrong_passphrase"
    with pytest.raises(ValidationError) as exc2:
        ceremony.load_root(root_dir, passphrase=None)
    assert code_of(exc2) == "passphrase_required"


def test_init_root_refuses_to_overwrite_and_weak_passphrase(tmp_path: Path) -> None:
    root_dir = tmp_path / "root"
    ceremony.init_root(root_dir, passphrase=PASS, now=now(), algorithm=SignerAlgorithm.EC_P256)
    before = {f.name: f.read_bytes() for f in root_dir.iterdir()}
    with pytest.raises(ConflictError) as exc:
        ceremony.init_root(root_dir, passphrase=PASS, now=now())
    assert code_of(exc) == "root_exists"
    assert {f.name: f.read_bytes() for f in root_dir.iterdir()} == before

    # A half-made directory (only the key file) is not overwritten either.
    half = tmp_path / "half"
    half.mkdir()
    (half / ceremony.ROOT_KEY).write_bytes(b"precious")
    with pytest.raises(ConflictError):
        ceremony.init_root(half, passphrase=PASS, now=now())
    assert (half / ceremony.ROOT_KEY).read_bytes() == b"precious"

    weak = tmp_path / "weak"
    with pytest.raises(ValidationError) as exc2:
        ceremony.init_root(weak, passphrase=b"short", now=now())
    assert code_of(exc2) == "weak_passphrase"
    assert not weak.exists() or not any(weak.iterdir())


def test_sign_ca_csr_file_root_logs_and_refuses_tampering(tmp_path: Path) -> None:
    root_dir = tmp_path / "root"
    info = ceremony.init_root(root_dir, passphrase=PASS, now=now())
    csr_pem, public_key = ca_csr(tmp_path)

    cert = ceremony.sign_ca_csr(root_dir, csr_pem, passphrase=PASS, now=now())
    cert.verify_directly_issued_by(info.certificate)
    assert cert.public_key() == public_key
    assert cert.issuer == info.certificate.subject
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca
    assert bc.path_length == 2
    assert cert.not_valid_after_utc <= info.certificate.not_valid_after_utc
    lines = issued_lines(root_dir)
    assert len(lines) == 1
    assert lines[0]["serial"] == format(cert.serial_number, "x")
    assert lines[0]["fingerprint_sha256"] == pki.fingerprint_sha256(cert)

    # Tampered CSR: refused before the root key is used, nothing logged.
    with pytest.raises(ValidationError) as exc:
        ceremony.sign_ca_csr(root_dir, tamper(csr_pem), passphrase=PASS, now=now())
    assert code_of(exc) == "csr_bad_signature"
    # Wrong passphrase: refused, nothing logged.
    with pytest.raises(KeyStoreError) as exc2:
        ceremony.sign_ca_csr(root_dir, csr_pem, passphrase=b"wrong passphrase", now=now())
    assert code_of(exc2) == "wrong_passphrase"
    # A weak key is refused by policy.
    weak = ec.generate_private_key(ec.SECP256K1())
    weak_csr = (x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "x")]))
                .sign(weak, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(FleetTrustError) as exc3:
        ceremony.sign_ca_csr(root_dir, weak_csr, passphrase=PASS, now=now())
    assert code_of(exc3) == "key_not_allowed"
    assert len(issued_lines(root_dir)) == 1

    # Every signature is appended.
    second = ceremony.sign_ca_csr(root_dir, ca_csr(tmp_path / "b", "Fleet CA 2")[0],
                                  passphrase=PASS, now=now(), path_length=1)
    lines = issued_lines(root_dir)
    assert [e["serial"] for e in lines] == [format(c.serial_number, "x") for c in (cert, second)]

    # A directory whose root.pem does not match the key is refused.
    other = tmp_path / "other"
    ceremony.init_root(other, passphrase=PASS, now=now())
    (root_dir / ceremony.ROOT_CERT).write_bytes((other / ceremony.ROOT_CERT).read_bytes())
    with pytest.raises(ValidationError) as exc4:
        ceremony.sign_ca_csr(root_dir, csr_pem, passphrase=PASS, now=now())
    assert code_of(exc4) == "root_key_mismatch"
    with pytest.raises(ValidationError) as exc5:
        ceremony.sign_ca_csr(tmp_path / "nowhere", csr_pem, passphrase=PASS, now=now())
    assert code_of(exc5) == "not_root_dir"


# --- PKCS#11 root --------------------------------------------------------------------------------


@pytest.mark.pkcs11
@pytest.mark.skipif(not softhsm_available(), reason="SoftHSM2 not installed")
def test_init_root_and_sign_with_pkcs11_token(tmp_path: Path) -> None:
    config = make_softhsm_token(tmp_path, "ceremony-root")
    root_dir = tmp_path / "root"
    info = ceremony.init_root(root_dir, passphrase=None, now=now(), pkcs11=config)
    assert info.key_backend == "pkcs11"
    assert not (root_dir / ceremony.ROOT_KEY).exists()  # the key never leaves the token
    meta = json.loads((root_dir / ceremony.ROOT_META).read_text())
    assert meta["key_backend"] == "pkcs11"
    assert meta["token_label"] == "ceremony-root"
    assert meta["key_id"].startswith("pkcs11:root-ca-")
    for f in root_dir.iterdir():
        assert TEST_USER_PIN.encode() not in f.read_bytes()
    info.certificate.verify_directly_issued_by(info.certificate)

    csr_pem, public_key = ca_csr(tmp_path)
    cert = ceremony.sign_ca_csr(root_dir, csr_pem, passphrase=None, now=now(),
                                pkcs11_pin=TEST_USER_PIN)
    cert.verify_directly_issued_by(info.certificate)
    assert cert.public_key() == public_key
    assert len(issued_lines(root_dir)) == 1

    with pytest.raises(ValidationError) as exc:
        ceremony.sign_ca_csr(root_dir, csr_pem, passphrase=None, now=now())
    assert code_of(exc) == "pin_required"
    with pytest.raises(KeyStoreError) as exc3:
        ceremony.sign_ca_csr(root_dir, csr_pem, passphrase=None, now=now(), pkcs11_pin="0000-wrong")
    assert code_of(exc3) == "wrong_pin"
    with pytest.raises(ValidationError) as exc2:
        ceremony.sign_ca_csr(root_dir, tamper(csr_pem), passphrase=None, now=now(),
                             pkcs11_pin=TEST_USER_PIN)
    assert code_of(exc2) == "csr_bad_signature"
    assert len(issued_lines(root_dir)) == 1
    # A second root in the same token is a new key; the first directory is not overwritten.
    with pytest.raises(ConflictError):
        ceremony.init_root(root_dir, passphrase=None, now=now(), pkcs11=config)
