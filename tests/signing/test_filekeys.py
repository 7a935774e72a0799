"""FileKeyStore / FileSigner: real files, real cryptography, signatures checked by openssl too.

The X.509 builders and openssl checks at the top are reused by ``test_pkcs11``.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import re
import shutil
import stat
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fleettrust.errors import KeyStoreError
from fleettrust.signing.base import KeyStore, Signer, SignerAlgorithm
from fleettrust.signing.filekeys import (
    FileKeyStore,
    FileSigner,
    generate_private_key,
    load_encrypted_key,
    sanitize_label,
    write_encrypted_key,
)

PASSPHRASE = b"correct horse battery staple"
ALGORITHMS = [SignerAlgorithm.EC_P256, SignerAlgorithm.EC_P384]
KEY_ID_PATTERN = r"^file:[a-z0-9-]{1,40}-[0-9a-f]{16}$"

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not on PATH")


# --- shared X.509 helpers (also used by test_pkcs11) ------------------------------------------


def hash_for(algorithm: SignerAlgorithm) -> hashes.HashAlgorithm:
    return hashes.SHA256() if algorithm is SignerAlgorithm.EC_P256 else hashes.SHA384()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def build_ca(signer: Signer, cn: str = "fleettrust test root") -> x509.Certificate:
    """A self-signed CA certificate whose key is ``signer``'s."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    public = signer.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return signer.sign_certificate(builder)


def build_leaf(signer: Signer, ca: x509.Certificate) -> x509.Certificate:
    """An end-entity certificate for a fresh key, issued by ``ca`` (signed by ``signer``)."""
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    ca_public = ca.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-0001")]))
        .issuer_name(ca.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public),
            critical=False,
        )
    )
    return signer.sign_certificate(builder)


def build_crl(signer: Signer, ca: x509.Certificate) -> x509.CertificateRevocationList:
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(0x1234567890)
        .revocation_date(_now() - dt.timedelta(minutes=1))
        .build()
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.subject)
        .last_update(_now() - dt.timedelta(minutes=1))
        .next_update(_now() + dt.timedelta(days=1))
        .add_revoked_certificate(revoked)
        .add_extension(x509.CRLNumber(7), critical=False)
    )
    return signer.sign_crl(builder)


def build_csr(signer: Signer) -> x509.CertificateSigningRequest:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "factory-ca")]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    return signer.sign_csr(builder)


def _pem(
    obj: x509.Certificate | x509.CertificateRevocationList | x509.CertificateSigningRequest,
    path: Path,
) -> Path:
    path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
    return path


def _openssl(*args: str) -> str:
    result = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def check_x509_signatures(signer: Signer, tmp_path: Path) -> None:
    """Sign a CA cert, a leaf, a CRL and a CSR; verify each with cryptography and openssl."""
    public = signer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    ecdsa = ec.ECDSA(hash_for(signer.algorithm))

    ca = build_ca(signer)
    assert ca.public_key() == public
    assert ca.signature_hash_algorithm is not None
    assert ca.signature_hash_algorithm.name == hash_for(signer.algorithm).name
    ca.verify_directly_issued_by(ca)
    public.verify(ca.signature, ca.tbs_certificate_bytes, ecdsa)

    leaf = build_leaf(signer, ca)
    leaf.verify_directly_issued_by(ca)

    crl = build_crl(signer, ca)
    assert crl.is_signature_valid(public)
    assert crl.get_revoked_certificate_by_serial_number(0x1234567890) is not None

    csr = build_csr(signer)
    assert csr.is_signature_valid
    assert csr.public_key() == public
    public.verify(csr.signature, csr.tbs_certrequest_bytes, ecdsa)

    if shutil.which("openssl") is None:
        return
    ca_pem = _pem(ca, tmp_path / "ca.pem")
    leaf_pem = _pem(leaf, tmp_path / "leaf.pem")
    out = _openssl("verify", "-x509_strict", "-check_ss_sig", "-CAfile", str(ca_pem), str(ca_pem))
    assert f"{ca_pem}: OK" in out
    out = _openssl("verify", "-x509_strict", "-CAfile", str(ca_pem), str(leaf_pem))
    assert f"{leaf_pem}: OK" in out
    # openssl crl exits 0 even on "verify failure": the output is what counts.
    out = _openssl(
        "crl",
        "-in",
        str(_pem(crl, tmp_path / "crl.pem")),
        "-CAfile",
        str(ca_pem),
        "-noout",
        "-verify",
    )
    assert "verify OK" in out
    assert "failure" not in out.lower()
    out = _openssl("req", "-in", str(_pem(csr, tmp_path / "req.pem")), "-verify", "-noout")
    assert "verify OK" in out
    assert "failure" not in out.lower()


def check_sign_bytes(signer: Signer) -> None:
    public = signer.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    data = b"firmware manifest v1.2.3"
    signature = signer.sign_bytes(data)
    public.verify(signature, data, ec.ECDSA(hash_for(signer.algorithm)))
    with pytest.raises(InvalidSignature):
        public.verify(signature, data + b"!", ec.ECDSA(hash_for(signer.algorithm)))


# --- FileKeyStore -----------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path: Path) -> FileKeyStore:
    return FileKeyStore(tmp_path / "keys", PASSPHRASE)


def test_store_satisfies_protocols(store: FileKeyStore) -> None:
    keystore: KeyStore = store
    signer = keystore.generate("proto")
    assert isinstance(signer, Signer)


@pytest.mark.parametrize("passphrase", [b""])
def test_empty_passphrase_is_refused(tmp_path: Path, passphrase: bytes) -> None:
    with pytest.raises(ValueError, match="empty passphrase"):
        FileKeyStore(tmp_path / "keys", passphrase)
    key = generate_private_key(SignerAlgorithm.EC_P256)
    with pytest.raises(ValueError, match="empty passphrase"):
        write_encrypted_key(tmp_path / "root.pem", key, passphrase)
    assert not (tmp_path / "root.pem").exists()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_generate_load_delete_round_trip(
    store: FileKeyStore, tmp_path: Path, algorithm: SignerAlgorithm
) -> None:
    signer = store.generate("Factory CA / Shenzhen #1", algorithm)
    assert signer.algorithm is algorithm
    assert signer.key_id.startswith("file:factory-ca-shenzhen-1-")
    assert re.fullmatch(KEY_ID_PATTERN, signer.key_id)
    assert store.load(signer.key_id) is signer  # cached

    fresh = FileKeyStore(tmp_path / "keys", PASSPHRASE)  # no cache: decrypts the file
    loaded = fresh.load(signer.key_id)
    assert loaded is not signer
    assert loaded.public_key() == signer.public_key()
    check_sign_bytes(loaded)

    store.delete(signer.key_id)
    assert not store.path_for(signer.key_id).exists()
    with pytest.raises(KeyStoreError) as err:
        store.load(signer.key_id)
    assert err.value.code == "key_not_found"
    with pytest.raises(KeyStoreError) as err:
        store.delete(signer.key_id)
    assert err.value.code == "key_not_found"


def test_key_file_is_private_and_encrypted(store: FileKeyStore) -> None:
    signer = store.generate("root")
    path = store.path_for(signer.key_id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    data = path.read_bytes()
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in data
    assert b"BEGIN PRIVATE KEY" not in data
    assert b"BEGIN EC PRIVATE KEY" not in data
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(data, password=None)
    assert sorted(p.name for p in store.directory.iterdir()) == [path.name]  # no temp leftovers


def test_existing_directory_is_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "loose"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)  # noqa: S103 - deliberately loose, the store must tighten it
    FileKeyStore(directory, PASSPHRASE)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


def test_wrong_passphrase_gives_precise_error(store: FileKeyStore, tmp_path: Path) -> None:
    signer = store.generate("ca")
    other = FileKeyStore(tmp_path / "keys", b"not the passphrase")
    with pytest.raises(KeyStoreError) as err:
        other.load(signer.key_id)
    assert err.value.message == f"cannot decrypt key {signer.key_id}: wrong key-store passphrase"
    assert err.value.code == "wrong_passphrase"


def test_missing_key(store: FileKeyStore) -> None:
    key_id = "file:nothing-0123456789abcdef"
    with pytest.raises(KeyStoreError) as err:
        store.load(key_id)
    assert err.value.code == "key_not_found"
    assert key_id in err.value.message


@pytest.mark.parametrize(
    "key_id",
    [
        "file:../../etc/passwd",
        "file:../keys-0123456789abcdef",
        "file:a/b-0123456789abcdef",
        "file:/etc/shadow-0123456789abcdef",
        "file:UPPER-0123456789abcdef",
        "file:x-0123456789abcde",  # 15 hex
        "file:-0123456789abcdef",
        "pkcs11:x-0123456789abcdef",
        "file:x-0123456789abcdef\n",
        "file:x-0123456789abcdef.pem",
    ],
)
def test_key_ids_that_could_escape_are_rejected(store: FileKeyStore, key_id: str) -> None:
    with pytest.raises(KeyStoreError) as err:
        store.load(key_id)
    assert err.value.code == "invalid_key_id"
    with pytest.raises(KeyStoreError):
        store.delete(key_id)


def test_tampered_key_file(store: FileKeyStore, tmp_path: Path) -> None:
    signer = store.generate("ca")
    path = store.path_for(signer.key_id)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = b"A" * (len(lines[2]) - 1) + b"\n"
    path.write_bytes(b"".join(lines))
    with pytest.raises(KeyStoreError) as err:
        FileKeyStore(tmp_path / "keys", PASSPHRASE).load(signer.key_id)
    assert err.value.code in {"unsupported_key", "wrong_passphrase"}


def test_plaintext_key_file_is_refused(store: FileKeyStore) -> None:
    key_id = "file:plain-0123456789abcdef"
    key = ec.generate_private_key(ec.SECP256R1())
    store.path_for(key_id).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(KeyStoreError) as err:
        store.load(key_id)
    assert err.value.code == "unsupported_key"


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("Factory CA / Shenzhen #1", "factory-ca-shenzhen-1"),
        ("../../etc", "etc"),
        ("", "key"),
        ("———", "key"),
        ("x" * 80, "x" * 40),
        ("a" * 39 + "-b", "a" * 39),
    ],
)
def test_label_sanitizing(label: str, expected: str) -> None:
    assert sanitize_label(label) == expected


@needs_openssl
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_sign_x509_objects(store: FileKeyStore, tmp_path: Path, algorithm: SignerAlgorithm) -> None:
    signer = store.generate("x509", algorithm)
    check_x509_signatures(signer, tmp_path)
    check_sign_bytes(signer)


def test_repr_contains_no_key_material(store: FileKeyStore) -> None:
    signer = store.generate("secretive", SignerAlgorithm.EC_P384)
    text = repr(signer) + str(signer) + repr(store)
    assert text.startswith(f"FileSigner(key_id={signer.key_id!r}, algorithm='ec-p384')")
    # reaching into the name-mangled slot on purpose (mypy cannot see it): we need the secret
    private_value = signer._FileSigner__private_key  # type: ignore[attr-defined]
    numbers = private_value.private_numbers()
    assert str(numbers.private_value) not in text
    assert format(numbers.private_value, "x") not in text
    assert PASSPHRASE.decode() not in text
    assert not any(name for name in dir(signer) if "private" in name and not name.startswith("_"))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(signer)


def test_concurrent_load_decrypts_once_per_winner(store: FileKeyStore, tmp_path: Path) -> None:
    key_id = store.generate("busy").key_id
    fresh = FileKeyStore(tmp_path / "keys", PASSPHRASE)
    barrier = threading.Barrier(8)

    def work(_: int) -> FileSigner:
        barrier.wait()
        return fresh.load(key_id)

    with ThreadPoolExecutor(max_workers=8) as pool:
        signers = list(pool.map(work, range(8)))
    assert all(s is signers[0] for s in signers)


# --- offline-ceremony helpers -----------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_ceremony_helpers(tmp_path: Path, algorithm: SignerAlgorithm) -> None:
    key = generate_private_key(algorithm)
    path = tmp_path / "root-2026.pem"
    write_encrypted_key(path, key, PASSPHRASE)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()

    signer = load_encrypted_key(path, PASSPHRASE)
    assert signer.key_id == "file:root-2026"
    assert signer.algorithm is algorithm
    assert signer.public_key() == key.public_key()
    check_sign_bytes(signer)

    with pytest.raises(KeyStoreError) as err:
        write_encrypted_key(path, generate_private_key(algorithm), PASSPHRASE)
    assert err.value.code == "key_exists"
    assert load_encrypted_key(path, PASSPHRASE).public_key() == key.public_key()  # untouched

    with pytest.raises(KeyStoreError, match="wrong key-store passphrase"):
        load_encrypted_key(path, b"wrong")
    with pytest.raises(KeyStoreError) as err:
        load_encrypted_key(tmp_path / "absent.pem", PASSPHRASE)
    assert err.value.code == "key_not_found"


def test_unsupported_curve_is_refused() -> None:
    with pytest.raises(KeyStoreError) as err:
        FileSigner("file:x", ec.generate_private_key(ec.SECP521R1()))
    assert err.value.code == "unsupported_key"
