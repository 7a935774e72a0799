"""File-backed ECDSA keys: encrypted PKCS#8 PEM files and the signer that uses them.

What this module does:

* :class:`FileKeyStore` keeps one key per file in a private directory (mode 0700). Every key is
  a PKCS#8 PEM encrypted with the store passphrase (``BestAvailableEncryption``), written
  atomically (temporary file in the same directory, ``fsync``, ``os.replace``, directory
  ``fsync``) with mode 0600. Decrypted signers are cached in memory, guarded by a lock.
* :class:`FileSigner` signs certificates, CRLs, CSRs and raw bytes with an in-memory key using
  ``cryptography`` directly (SHA-256 for P-256, SHA-384 for P-384).
* :func:`generate_private_key`, :func:`write_encrypted_key` and :func:`load_encrypted_key` are
  the stand-alone pieces the offline root ceremony uses on a single named file.

What it does NOT do: it does not choose or store the passphrase (the caller passes it), does not
decide what may be signed (no policy), never writes a key unencrypted, and never overwrites an
existing key file. Key material is never part of a ``key_id``, a ``repr`` or an error message.

Error codes raised (all :class:`~fleettrust.errors.KeyStoreError`): ``key_not_found``,
``invalid_key_id``, ``wrong_passphrase``, ``key_exists``, ``unsupported_key``, ``key_io_error``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
import threading
from pathlib import Path
from typing import NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust.errors import KeyStoreError
from fleettrust.signing.base import SignerAlgorithm

__all__ = [
    "FileKeyStore",
    "FileSigner",
    "generate_private_key",
    "load_encrypted_key",
    "write_encrypted_key",
]

KEY_ID_PREFIX = "file:"
_LABEL_MAX = 40
_KEY_ID_RE = re.compile(r"^file:(?P<name>[a-z0-9](?:[a-z0-9-]{0,39})-[0-9a-f]{16})$")
_KEY_SUFFIX = ".pem"

_CURVES: dict[SignerAlgorithm, type[ec.EllipticCurve]] = {
    SignerAlgorithm.EC_P256: ec.SECP256R1,
    SignerAlgorithm.EC_P384: ec.SECP384R1,
}


def _hash_for(algorithm: SignerAlgorithm) -> hashes.SHA256 | hashes.SHA384:
    return hashes.SHA256() if algorithm is SignerAlgorithm.EC_P256 else hashes.SHA384()


def _algorithm_of(key: ec.EllipticCurvePrivateKey) -> SignerAlgorithm:
    if isinstance(key.curve, ec.SECP256R1):
        return SignerAlgorithm.EC_P256
    if isinstance(key.curve, ec.SECP384R1):
        return SignerAlgorithm.EC_P384
    raise KeyStoreError(
        f"unsupported EC curve {key.curve.name}: only P-256 and P-384 are allowed",
        code="unsupported_key",
    )


def sanitize_label(label: str) -> str:
    """Lower-case ``label`` and reduce it to ``[a-z0-9-]``, at most 40 characters, never empty."""
    cleaned = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    cleaned = cleaned[:_LABEL_MAX].strip("-")
    return cleaned or "key"


def _check_passphrase(passphrase: bytes) -> None:
    if not isinstance(passphrase, bytes):
        raise TypeError("the key passphrase must be bytes")
    if not passphrase:
        raise ValueError("an empty passphrase is not allowed: keys are always encrypted at rest")


class FileSigner:
    """Signs with one in-memory EC private key; the key object is never exposed.

    The private key lives in a private slot; ``repr``/``str`` show only the key id and the
    algorithm, and the signer refuses to be pickled or copied (that would copy key material).
    """

    __slots__ = ("__private_key", "_algorithm", "_hash", "_key_id")

    def __init__(self, key_id: str, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey):
            raise KeyStoreError(f"key {key_id} is not an EC private key", code="unsupported_key")
        self._key_id = key_id
        self._algorithm = _algorithm_of(private_key)
        self._hash = _hash_for(self._algorithm)
        self.__private_key = private_key

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def algorithm(self) -> SignerAlgorithm:
        return self._algorithm

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self.__private_key.public_key()

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        return builder.sign(self.__private_key, self._hash)

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        return builder.sign(self.__private_key, self._hash)

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        return builder.sign(self.__private_key, self._hash)

    def sign_bytes(self, data: bytes) -> bytes:
        return self.__private_key.sign(data, ec.ECDSA(self._hash))

    def __repr__(self) -> str:
        return f"FileSigner(key_id={self._key_id!r}, algorithm={self._algorithm.value!r})"

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("FileSigner holds a private key and cannot be pickled or copied")


# --- stand-alone helpers (offline root ceremony) ---------------------------------------------


def generate_private_key(algorithm: SignerAlgorithm) -> ec.EllipticCurvePrivateKey:
    """Create a new in-memory EC private key for ``algorithm`` (P-256 or P-384)."""
    return ec.generate_private_key(_CURVES[SignerAlgorithm(algorithm)]())


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_encrypted_key(path: Path, key: ec.EllipticCurvePrivateKey, passphrase: bytes) -> None:
    """Write ``key`` to ``path`` as an encrypted PKCS#8 PEM, atomically, with mode 0600.

    Refuses an empty passphrase (``ValueError``) and an existing ``path`` (``key_exists``): a
    key file is never overwritten.
    """
    _check_passphrase(passphrase)
    path = Path(path)
    pem = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.BestAvailableEncryption(passphrase),
    )
    directory = path.parent
    if path.exists():
        raise KeyStoreError(f"refusing to overwrite existing key file {path}", code="key_exists")
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=_KEY_SUFFIX, dir=directory)
    except OSError as exc:
        raise KeyStoreError(
            f"cannot create a key file in {directory}: {exc.strerror}", code="key_io_error"
        ) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        _fsync_directory(directory)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise KeyStoreError(
            f"cannot write key file {path}: {exc.strerror}", code="key_io_error"
        ) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _read_signer(path: Path, passphrase: bytes, key_id: str) -> FileSigner:
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise KeyStoreError(
            f"key {key_id} not found ({path} does not exist)", code="key_not_found", key_id=key_id
        ) from exc
    except OSError as exc:
        raise KeyStoreError(
            f"cannot read key {key_id} from {path}: {exc.strerror}", code="key_io_error"
        ) from exc
    if b"-----BEGIN ENCRYPTED PRIVATE KEY-----" not in data:
        raise KeyStoreError(
            f"key file {path} for {key_id} is not an encrypted PKCS#8 PEM; refusing to use it",
            code="unsupported_key",
        )
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except ValueError as exc:
        if "password" in str(exc).lower():
            raise KeyStoreError(
                f"cannot decrypt key {key_id}: wrong key-store passphrase",
                code="wrong_passphrase",
                key_id=key_id,
            ) from exc
        raise KeyStoreError(
            f"cannot decrypt key {key_id}: the file {path} is corrupt or not a supported key",
            code="unsupported_key",
        ) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyStoreError(
            f"key {key_id} is a {type(key).__name__}, not an EC private key",
            code="unsupported_key",
        )
    return FileSigner(key_id, key)


def load_encrypted_key(path: Path, passphrase: bytes) -> FileSigner:
    """Decrypt the PKCS#8 PEM at ``path``; the signer's key id is ``file:<file stem>``."""
    _check_passphrase(passphrase)
    path = Path(path)
    return _read_signer(path, passphrase, f"{KEY_ID_PREFIX}{path.stem}")


# --- the key store -----------------------------------------------------------------------------


class FileKeyStore:
    """A :class:`~fleettrust.signing.base.KeyStore` of encrypted PEM files in one directory.

    ``key_id`` is ``file:<label>-<16 hex>``; the file is ``<label>-<16 hex>.pem``. Safe to share
    between threads.
    """

    def __init__(self, directory: Path, passphrase: bytes) -> None:
        _check_passphrase(passphrase)
        self._directory = Path(directory).absolute()
        self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self._directory, 0o700)
        self.__passphrase = passphrase
        self._cache: dict[str, FileSigner] = {}
        self._lock = threading.Lock()

    @property
    def directory(self) -> Path:
        return self._directory

    def path_for(self, key_id: str) -> Path:
        """The file holding ``key_id``; ``invalid_key_id`` if the id could escape the store."""
        match = _KEY_ID_RE.fullmatch(key_id) if isinstance(key_id, str) else None
        if match is None:
            raise KeyStoreError(
                f"invalid file key id {key_id!r}: expected 'file:<label>-<16 hex>'",
                code="invalid_key_id",
            )
        path = self._directory / f"{match['name']}{_KEY_SUFFIX}"
        if path.parent != self._directory:  # defence in depth; the regex already forbids "/"
            raise KeyStoreError(
                f"key id {key_id!r} escapes the key directory", code="invalid_key_id"
            )
        return path

    def generate(
        self, label: str, algorithm: SignerAlgorithm = SignerAlgorithm.EC_P256
    ) -> FileSigner:
        key = generate_private_key(algorithm)
        key_id = f"{KEY_ID_PREFIX}{sanitize_label(label)}-{secrets.token_hex(8)}"
        write_encrypted_key(self.path_for(key_id), key, self.__passphrase)
        signer = FileSigner(key_id, key)
        with self._lock:
            self._cache[key_id] = signer
        return signer

    def load(self, key_id: str) -> FileSigner:
        path = self.path_for(key_id)
        with self._lock:
            cached = self._cache.get(key_id)
        if cached is not None:
            return cached
        # Decrypt outside the lock so one slow load does not block every other key; two threads
        # racing on the same key both decrypt, and the first one stored wins.
        signer = _read_signer(path, self.__passphrase, key_id)
        with self._lock:
            if not path.exists():  # deleted while we were decrypting: do not resurrect it
                raise KeyStoreError(
                    f"key {key_id} not found ({path} was deleted)",
                    code="key_not_found",
                    key_id=key_id,
                )
            return self._cache.setdefault(key_id, signer)

    def delete(self, key_id: str) -> None:
        path = self.path_for(key_id)
        with self._lock:
            self._cache.pop(key_id, None)
            try:
                path.unlink()
            except FileNotFoundError as exc:
                raise KeyStoreError(
                    f"key {key_id} not found ({path} does not exist)",
                    code="key_not_found",
                    key_id=key_id,
                ) from exc
            except OSError as exc:
                raise KeyStoreError(
                    f"cannot delete key {key_id}: {exc.strerror}", code="key_io_error"
                ) from exc
            _fsync_directory(self._directory)

    def __repr__(self) -> str:
        return f"FileKeyStore(directory={str(self._directory)!r})"
