"""PKCS#11 token keys (HSM, SoftHSM2): key store and signer built on python-pkcs11.

What this module does:

* :class:`Pkcs11KeyStore` creates EC key pairs *on* the token (private key: token object,
  private, sensitive, non-extractable, sign-only), finds them again by ``CKA_ID``/``CKA_LABEL``
  and destroys them. ``key_id`` is ``pkcs11:<label>-<16 hex>``; ``CKA_LABEL`` is the part after
  ``pkcs11:`` and ``CKA_ID`` the 8 bytes of the hex suffix.
* :class:`Pkcs11Signer` signs X.509 objects although ``cryptography`` cannot sign with an
  external key: the builder is signed with a throw-away in-memory key of the same curve (only
  to obtain the DER "to be signed" part and the ECDSA-with-SHA-256/384 AlgorithmIdentifier),
  the token signs the digest of those bytes (``CKM_ECDSA``), the outer DER SEQUENCE is
  re-assembled, parsed back and its signature verified against the token's public key before
  it is returned. For CSRs the throw-away key's SubjectPublicKeyInfo is replaced by the token
  key's before signing.
* One logged-in read/write session per (module, token) is shared by every store in the process
  and guarded by a lock (PKCS#11 sessions are not thread-safe, and login state is per
  application, not per session, so two independent logins would collide).
  :func:`rescan_tokens` re-initialises a module to see tokens created after it was loaded.

What it does NOT do: it never imports, exports or wraps private keys, does not initialise tokens
or set PINs (that is the HSM administrator's job), and holds no policy.

Error codes raised (all :class:`~fleettrust.errors.KeyStoreError`): ``pkcs11_library_error``,
``token_not_found``, ``wrong_pin``, ``pin_locked``, ``key_not_found``, ``invalid_key_id``,
``key_store_closed``, ``unsafe_key_attributes``, ``signature_invalid``, ``pkcs11_error``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, TypeVar

import pkcs11
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import exceptions as p11e
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from fleettrust.errors import KeyStoreError
from fleettrust.signing.base import SignerAlgorithm
from fleettrust.signing.filekeys import sanitize_label

if TYPE_CHECKING:
    from pkcs11._pkcs11 import lib as _p11_lib

__all__ = ["Pkcs11Config", "Pkcs11KeyStore", "Pkcs11Signer", "rescan_tokens"]

KEY_ID_PREFIX = "pkcs11:"
_KEY_ID_RE = re.compile(r"^pkcs11:(?P<name>[a-z0-9][a-z0-9-]{0,39}-(?P<hex>[0-9a-f]{16}))$")

_T = TypeVar("_T")

_CURVE_NAMES: dict[SignerAlgorithm, str] = {
    SignerAlgorithm.EC_P256: "secp256r1",
    SignerAlgorithm.EC_P384: "secp384r1",
}
_CURVES: dict[SignerAlgorithm, type[ec.EllipticCurve]] = {
    SignerAlgorithm.EC_P256: ec.SECP256R1,
    SignerAlgorithm.EC_P384: ec.SECP384R1,
}
_COORDINATE_BYTES: dict[SignerAlgorithm, int] = {
    SignerAlgorithm.EC_P256: 32,
    SignerAlgorithm.EC_P384: 48,
}

# Errors after which the session itself is gone (module re-initialised, token removed, logged
# out behind our back): drop the session WITHOUT closing it (its handle number may already have
# been reused by a new session) and retry once on a fresh one.
_REOPEN_ERRORS: tuple[type[Exception], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.UserNotLoggedIn,
)
# Errors after which cached object handles are stale: look the objects up again and retry once.
_REFIND_ERRORS: tuple[type[Exception], ...] = (p11e.KeyHandleInvalid, p11e.ObjectHandleInvalid)


def _hash_for(algorithm: SignerAlgorithm) -> hashes.SHA256 | hashes.SHA384:
    return hashes.SHA256() if algorithm is SignerAlgorithm.EC_P256 else hashes.SHA384()


def _digest(algorithm: SignerAlgorithm, data: bytes) -> bytes:
    if algorithm is SignerAlgorithm.EC_P256:
        return hashlib.sha256(data).digest()
    return hashlib.sha384(data).digest()


def _p11_name(exc: BaseException) -> str:
    """python-pkcs11 exceptions often have an empty message; fall back to the class name."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --- minimal DER (only what re-assembling a signed X.509 object needs) -------------------------


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    octets = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(octets)]) + octets


def _der_tlv(tag: int, content: bytes) -> bytes:
    """Encode one DER element with a single-octet ``tag``."""
    return bytes([tag]) + _der_length(len(content)) + content


def _der_children(der: bytes) -> list[bytes]:
    """Split one DER SEQUENCE into the full encodings of its direct children."""

    def header(buf: bytes, pos: int) -> tuple[int, int]:  # -> (content start, content length)
        if pos + 2 > len(buf) or buf[pos] & 0x1F == 0x1F:
            raise ValueError("truncated DER or multi-octet tag")
        first = buf[pos + 1]
        if first < 0x80:
            return pos + 2, first
        count = first & 0x7F
        if count == 0 or count > 4 or pos + 2 + count > len(buf):
            raise ValueError("indefinite or unsupported DER length")
        return pos + 2 + count, int.from_bytes(buf[pos + 2 : pos + 2 + count], "big")

    if not der or der[0] != 0x30:
        raise ValueError("not a DER SEQUENCE")
    start, length = header(der, 0)
    if start + length != len(der):
        raise ValueError("trailing or missing bytes after DER SEQUENCE")
    children, pos = [], start
    while pos < len(der):
        body, size = header(der, pos)
        if body + size > len(der):
            raise ValueError("DER child overruns its parent")
        children.append(der[pos : body + size])
        pos = body + size
    return children


def _assemble_signed(tbs: bytes, signature_algorithm: bytes, signature: bytes) -> bytes:
    """SEQUENCE { tbs, signatureAlgorithm, BIT STRING (0 unused bits) signature }."""
    return _der_tlv(0x30, tbs + signature_algorithm + _der_tlv(0x03, b"\x00" + signature))


_THROWAWAY_LOCK = threading.Lock()
_THROWAWAY_KEYS: dict[SignerAlgorithm, ec.EllipticCurvePrivateKey] = {}


def _throwaway_key(algorithm: SignerAlgorithm) -> ec.EllipticCurvePrivateKey:
    """An in-memory key used only to make cryptography emit the TBS bytes; never trusted."""
    with _THROWAWAY_LOCK:
        key = _THROWAWAY_KEYS.get(algorithm)
        if key is None:
            key = ec.generate_private_key(_CURVES[algorithm]())
            _THROWAWAY_KEYS[algorithm] = key
        return key


# --- configuration and shared per-token sessions ------------------------------------------------


@dataclass(frozen=True)
class Pkcs11Config:
    """Where the key store lives: PKCS#11 module path, token label and user PIN."""

    module: str
    token_label: str
    user_pin: str

    def __repr__(self) -> str:
        return (
            f"Pkcs11Config(module={self.module!r}, token_label={self.token_label!r}, "
            "user_pin=<hidden>)"
        )

    __str__ = __repr__


class _Module:
    """One loaded PKCS#11 library; ``generation`` counts re-initialisations."""

    def __init__(self, path: str, lib: _p11_lib) -> None:
        self.path = path
        self.lib = lib
        self.generation = 0


_REGISTRY_LOCK = threading.Lock()
_MODULES: dict[str, _Module] = {}
_TOKENS: dict[tuple[str, str], _TokenSession] = {}


def _load_module(path: str) -> _Module:
    """Load (once per process) the PKCS#11 library at ``path``. Caller holds _REGISTRY_LOCK."""
    module = _MODULES.get(path)
    if module is None:
        try:
            lib = pkcs11.lib(path)
        except (p11e.PKCS11Error, OSError) as exc:
            raise KeyStoreError(
                f"cannot load PKCS#11 library {path}: {_p11_name(exc)}",
                code="pkcs11_library_error",
                module=path,
            ) from exc
        module = _MODULES[path] = _Module(path, lib)
    return module


class _TokenSession:
    """The one logged-in R/W session on one token, shared by all stores of this process."""

    def __init__(self, module: _Module, label: str, pin: str) -> None:
        self.module = module
        self.label = label
        self._pin = pin
        self.lock = threading.Lock()
        self.users = 0
        self.epoch = 0  # bumped whenever object handles may have become stale
        self._session: pkcs11.Session | None = None
        self._generation = -1

    def pin_matches(self, pin: str) -> bool:
        return hmac.compare_digest(pin.encode("utf-8"), self._pin.encode("utf-8"))

    def _find_token(self) -> pkcs11.Token:
        lib = self.module.lib
        try:
            return lib.get_token(token_label=self.label)
        except p11e.NoSuchToken as exc:
            try:
                labels = sorted(repr(t.label) for t in lib.get_tokens() if t.label)
            except p11e.PKCS11Error:
                labels = []
            present = ", ".join(labels) if labels else "no initialised tokens"
            raise KeyStoreError(
                f"PKCS#11 token {self.label!r} not found in {self.module.path} "
                f"(tokens present: {present})",
                code="token_not_found",
                token_label=self.label,
            ) from exc
        except p11e.MultipleTokensReturned as exc:
            raise KeyStoreError(
                f"more than one PKCS#11 token is labelled {self.label!r} in {self.module.path}",
                code="token_not_found",
                token_label=self.label,
            ) from exc

    def open(self) -> None:
        """Open and log in a fresh session. Caller holds ``self.lock``."""
        token = self._find_token()
        try:
            session = token.open(rw=True, user_pin=self._pin)
        except p11e.UserAlreadyLoggedIn:
            # Someone else in this process logged in to this token outside our registry; login
            # state is per application, so an unauthenticated session is already a user session.
            session = token.open(rw=True)
        except (p11e.PinIncorrect, p11e.PinLenRange, p11e.PinInvalid) as exc:
            raise KeyStoreError(
                f"wrong PIN for PKCS#11 token {self.label!r} ({_p11_name(exc)})",
                code="wrong_pin",
                token_label=self.label,
            ) from exc
        except (p11e.PinLocked, p11e.PinExpired) as exc:
            raise KeyStoreError(
                f"the user PIN of PKCS#11 token {self.label!r} is locked or expired "
                f"({_p11_name(exc)}); the token administrator must reset it",
                code="pin_locked",
                token_label=self.label,
            ) from exc
        except p11e.PKCS11Error as exc:
            raise KeyStoreError(
                f"cannot open a session on PKCS#11 token {self.label!r}: {_p11_name(exc)}",
                code="pkcs11_error",
                token_label=self.label,
            ) from exc
        self._session = session
        self._generation = self.module.generation
        self.epoch += 1

    def run(self, op: Callable[[pkcs11.Session, int], _T], what: str) -> _T:
        """Run ``op(session, epoch)`` under the lock, recovering once from a lost session."""
        with self.lock:
            last: Exception = RuntimeError("no attempt made")
            for _attempt in range(2):
                if self._session is None or self._generation != self.module.generation:
                    self._session = None  # stale after rescan: do not close a reused handle
                    self.open()
                session = self._session
                if session is None:  # open() either sets a session or raises
                    raise self._failed(what, last)
                try:
                    return op(session, self.epoch)
                except _REOPEN_ERRORS as exc:
                    self._session, last = None, exc
                except _REFIND_ERRORS as exc:
                    self.epoch, last = self.epoch + 1, exc
                except p11e.PKCS11Error as exc:
                    raise self._failed(what, exc) from exc
            raise self._failed(what, last) from last

    def _failed(self, what: str, exc: BaseException) -> KeyStoreError:
        return KeyStoreError(
            f"PKCS#11 token {self.label!r}: {what} failed: {_p11_name(exc)}",
            code="pkcs11_error",
            token_label=self.label,
        )

    def close(self) -> None:
        """Log out and close. Caller holds ``self.lock``."""
        session, self._session = self._session, None
        if session is not None and self._generation == self.module.generation:
            with contextlib.suppress(p11e.PKCS11Error):  # going away anyway; nothing to report
                session.close()


def _acquire_token(config: Pkcs11Config) -> _TokenSession:
    with _REGISTRY_LOCK:
        module = _load_module(config.module)
        key = (config.module, config.token_label)
        token = _TOKENS.get(key)
        if token is None:
            token = _TokenSession(module, config.token_label, config.user_pin)
            with token.lock:
                token.open()
            _TOKENS[key] = token
        elif not token.pin_matches(config.user_pin):
            raise KeyStoreError(
                f"wrong PIN for PKCS#11 token {config.token_label!r} (PinIncorrect)",
                code="wrong_pin",
                token_label=config.token_label,
            )
        token.users += 1
        return token


def _release_token(token: _TokenSession) -> None:
    with _REGISTRY_LOCK:
        token.users -= 1
        if token.users > 0:
            return
        _TOKENS.pop((token.module.path, token.label), None)
        with token.lock:
            token.close()


def rescan_tokens(module: str) -> None:
    """Re-initialise ``module`` so tokens created since it was loaded become visible.

    Many modules (SoftHSM2 among them) enumerate tokens only in ``C_Initialize``. This
    invalidates every session and object handle of the module in this process; open stores
    transparently log in again on their next operation. No-op if the module is not loaded.
    """
    with _REGISTRY_LOCK:
        loaded = _MODULES.get(module)
        if loaded is None:
            return
        tokens = sorted(
            (t for (path, _), t in _TOKENS.items() if path == module), key=lambda t: t.label
        )
        for token in tokens:
            token.lock.acquire()
        try:
            loaded.generation += 1
            try:
                loaded.lib.reinitialize()
            except p11e.PKCS11Error as exc:
                raise KeyStoreError(
                    f"cannot re-initialise PKCS#11 library {module}: {_p11_name(exc)}",
                    code="pkcs11_library_error",
                ) from exc
        finally:
            for token in reversed(tokens):
                token.lock.release()


# --- signer -----------------------------------------------------------------------------------


def _public_key_from_object(obj: pkcs11.PublicKey, key_id: str) -> ec.EllipticCurvePublicKey:
    try:
        public = serialization.load_der_public_key(encode_ec_public_key(obj))
    except (ValueError, KeyError, p11e.PKCS11Error) as exc:
        raise KeyStoreError(
            f"cannot read the public key of {key_id} from the token: {exc}",
            code="pkcs11_error",
        ) from exc
    if not isinstance(public, ec.EllipticCurvePublicKey):
        raise KeyStoreError(f"key {key_id} is not an EC key", code="pkcs11_error")
    return public


def _algorithm_of(public: ec.EllipticCurvePublicKey, key_id: str) -> SignerAlgorithm:
    for algorithm, curve in _CURVES.items():
        if isinstance(public.curve, curve):
            return algorithm
    raise KeyStoreError(
        f"key {key_id} uses curve {public.curve.name}; only P-256 and P-384 are supported",
        code="pkcs11_error",
    )


class Pkcs11Signer:
    """Signs with a private key that stays on a PKCS#11 token.

    Holds only the key's ``CKA_ID``/``CKA_LABEL``, a cached object handle and the public key.
    Every signature is verified against the public key before it is returned. Obtain signers
    from :meth:`Pkcs11KeyStore.generate` / :meth:`Pkcs11KeyStore.load`, not by construction.
    """

    __slots__ = (
        "_algorithm",
        "_ck_id",
        "_ck_label",
        "_handle_epoch",
        "_key_id",
        "_private",
        "_public",
        "_spki",
        "_store",
    )

    def __init__(
        self,
        store: Pkcs11KeyStore,
        key_id: str,
        ck_id: bytes,
        ck_label: str,
        public: ec.EllipticCurvePublicKey,
    ) -> None:
        self._store = store
        self._key_id = key_id
        self._ck_id = ck_id
        self._ck_label = ck_label
        self._public = public
        self._algorithm = _algorithm_of(public, key_id)
        self._spki = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._private: pkcs11.SignMixin | None = None  # handle cache, valid for one epoch
        self._handle_epoch = -1

    @property
    def key_id(self) -> str:
        return self._key_id

    @property
    def algorithm(self) -> SignerAlgorithm:
        return self._algorithm

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public

    # -- token operations

    def _private_object(self, session: pkcs11.Session, epoch: int) -> pkcs11.SignMixin:
        """The private key object; looked up again whenever handles may be stale."""
        if self._private is None or self._handle_epoch != epoch:
            self._private = None
            obj = _find_key(
                session, ObjectClass.PRIVATE_KEY, self._ck_id, self._ck_label, self._key_id
            )
            if not isinstance(obj, pkcs11.SignMixin):
                raise KeyStoreError(
                    f"key {self._key_id} on the token cannot sign", code="pkcs11_error"
                )
            self._private, self._handle_epoch = obj, epoch
        return self._private

    def _sign_digest(self, digest: bytes) -> bytes:
        def op(session: pkcs11.Session, epoch: int) -> bytes:
            key = self._private_object(session, epoch)
            raw: bytes = key.sign(digest, mechanism=Mechanism.ECDSA)
            return raw

        raw = self._store._run(op, f"signing with {self._key_id}")
        size = _COORDINATE_BYTES[self._algorithm]
        if len(raw) != 2 * size:
            raise KeyStoreError(
                f"token returned a {len(raw)}-byte ECDSA signature for {self._key_id}, "
                f"expected {2 * size}",
                code="signature_invalid",
            )
        r = int.from_bytes(raw[:size], "big")
        s = int.from_bytes(raw[size:], "big")
        return encode_dss_signature(r, s)

    def _verify(self, signature: bytes, data: bytes, what: str) -> None:
        try:
            self._public.verify(signature, data, ec.ECDSA(_hash_for(self._algorithm)))
        except InvalidSignature as exc:
            raise KeyStoreError(
                f"the token's signature on the {what} does not verify with the public key of "
                f"{self._key_id}; refusing to return it",
                code="signature_invalid",
            ) from exc

    def _sign_tbs(self, tbs: bytes) -> bytes:
        return self._sign_digest(_digest(self._algorithm, tbs))

    # -- Signer protocol

    def sign_bytes(self, data: bytes) -> bytes:
        signature = self._sign_digest(_digest(self._algorithm, data))
        self._verify(signature, data, "data")
        return signature

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        draft = builder.sign(_throwaway_key(self._algorithm), _hash_for(self._algorithm))
        tbs = draft.tbs_certificate_bytes
        algorithm_id = _der_children(draft.public_bytes(serialization.Encoding.DER))[1]
        cert = x509.load_der_x509_certificate(
            _assemble_signed(tbs, algorithm_id, self._sign_tbs(tbs))
        )
        self._verify(cert.signature, cert.tbs_certificate_bytes, "certificate")
        return cert

    def sign_crl(
        self, builder: x509.CertificateRevocationListBuilder
    ) -> x509.CertificateRevocationList:
        draft = builder.sign(_throwaway_key(self._algorithm), _hash_for(self._algorithm))
        tbs = draft.tbs_certlist_bytes
        algorithm_id = _der_children(draft.public_bytes(serialization.Encoding.DER))[1]
        crl = x509.load_der_x509_crl(_assemble_signed(tbs, algorithm_id, self._sign_tbs(tbs)))
        self._verify(crl.signature, crl.tbs_certlist_bytes, "CRL")
        return crl

    def sign_csr(
        self, builder: x509.CertificateSigningRequestBuilder
    ) -> x509.CertificateSigningRequest:
        draft = builder.sign(_throwaway_key(self._algorithm), _hash_for(self._algorithm))
        # CertificationRequestInfo ::= SEQUENCE { version, subject, subjectPKInfo, [0] attrs }:
        # the draft carries the throw-away key, so put the token key's SPKI in its place.
        info = _der_children(draft.tbs_certrequest_bytes)
        info[2] = self._spki
        tbs = _der_tlv(0x30, b"".join(info))
        algorithm_id = _der_children(draft.public_bytes(serialization.Encoding.DER))[1]
        csr = x509.load_der_x509_csr(_assemble_signed(tbs, algorithm_id, self._sign_tbs(tbs)))
        if csr.public_key() != self._public:
            raise KeyStoreError(
                f"CSR for {self._key_id} carries the wrong public key", code="signature_invalid"
            )
        self._verify(csr.signature, csr.tbs_certrequest_bytes, "CSR")
        return csr

    def __repr__(self) -> str:
        return (
            f"Pkcs11Signer(key_id={self._key_id!r}, algorithm={self._algorithm.value!r}, "
            f"token={self._store.config.token_label!r})"
        )

    __str__ = __repr__

    def __reduce__(self) -> NoReturn:
        raise TypeError("Pkcs11Signer is bound to a live token session and cannot be pickled")


def _find_key(
    session: pkcs11.Session, object_class: ObjectClass, ck_id: bytes, ck_label: str, key_id: str
) -> pkcs11.Key:
    try:
        return session.get_key(
            object_class=object_class, key_type=KeyType.EC, label=ck_label, id=ck_id
        )
    except p11e.NoSuchKey as exc:
        kind = "private" if object_class is ObjectClass.PRIVATE_KEY else "public"
        raise KeyStoreError(
            f"key {key_id} not found on the token ({kind} key object is missing)",
            code="key_not_found",
            key_id=key_id,
        ) from exc
    except p11e.MultipleObjectsReturned as exc:
        raise KeyStoreError(
            f"more than one object on the token matches key {key_id}", code="pkcs11_error"
        ) from exc


# --- key store --------------------------------------------------------------------------------


class Pkcs11KeyStore:
    """A :class:`~fleettrust.signing.base.KeyStore` on one PKCS#11 token. Thread-safe.

    Opening the store loads the library (once per process) and logs in to the token (once per
    process and token). Call :meth:`close` (or use it as a context manager) to release it.
    """

    def __init__(self, config: Pkcs11Config) -> None:
        if not config.user_pin:
            raise ValueError("a PKCS#11 user PIN is required")
        self._config = config
        self._token = _acquire_token(config)
        self._closed = False
        self._close_lock = threading.Lock()

    @property
    def config(self) -> Pkcs11Config:
        return self._config

    def _run(self, op: Callable[[pkcs11.Session, int], _T], what: str) -> _T:
        if self._closed:
            raise KeyStoreError(
                f"the PKCS#11 key store for token {self._config.token_label!r} is closed",
                code="key_store_closed",
            )
        return self._token.run(op, what)

    @staticmethod
    def _parse(key_id: str) -> tuple[bytes, str]:
        match = _KEY_ID_RE.fullmatch(key_id) if isinstance(key_id, str) else None
        if match is None:
            raise KeyStoreError(
                f"invalid PKCS#11 key id {key_id!r}: expected 'pkcs11:<label>-<16 hex>'",
                code="invalid_key_id",
            )
        return bytes.fromhex(match["hex"]), match["name"]

    def generate(
        self, label: str, algorithm: SignerAlgorithm = SignerAlgorithm.EC_P256
    ) -> Pkcs11Signer:
        algorithm = SignerAlgorithm(algorithm)
        params = encode_named_curve_parameters(_CURVE_NAMES[algorithm])
        prefix = sanitize_label(label)

        def op(session: pkcs11.Session, _epoch: int) -> tuple[str, bytes, str, pkcs11.PublicKey]:
            while True:
                suffix = secrets.token_hex(8)
                ck_id, ck_label = bytes.fromhex(suffix), f"{prefix}-{suffix}"
                if not list(session.get_objects({Attribute.ID: ck_id})):
                    break
            public, private = session.generate_keypair(
                KeyType.EC,
                store=True,
                id=ck_id,
                label=ck_label,
                capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                public_template={
                    Attribute.EC_PARAMS: params,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.VERIFY: True,
                },
                # EC_PARAMS must NOT be in the private template: SoftHSM2 rejects it
                # (CKR_ATTRIBUTE_READ_ONLY), the token copies it from the public template.
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                    Attribute.DERIVE: False,
                    Attribute.DECRYPT: False,
                    Attribute.UNWRAP: False,
                },
            )
            # Some tokens silently ignore template attributes: check, and refuse a weak key.
            if private[Attribute.SENSITIVE] is not True or private[Attribute.EXTRACTABLE]:
                private.destroy()
                public.destroy()
                raise KeyStoreError(
                    f"token {self._config.token_label!r} created an extractable or "
                    "non-sensitive private key; it was destroyed",
                    code="unsafe_key_attributes",
                )
            return f"{KEY_ID_PREFIX}{ck_label}", ck_id, ck_label, public

        key_id, ck_id, ck_label, public_obj = self._run(op, f"generating a {algorithm.value} key")
        public = _public_key_from_object(public_obj, key_id)
        return Pkcs11Signer(self, key_id, ck_id, ck_label, public)

    def load(self, key_id: str) -> Pkcs11Signer:
        ck_id, ck_label = self._parse(key_id)

        def op(session: pkcs11.Session, _epoch: int) -> ec.EllipticCurvePublicKey:
            _find_key(session, ObjectClass.PRIVATE_KEY, ck_id, ck_label, key_id)
            public_obj = _find_key(session, ObjectClass.PUBLIC_KEY, ck_id, ck_label, key_id)
            if not isinstance(public_obj, pkcs11.PublicKey):
                raise KeyStoreError(
                    f"key {key_id}: public object has the wrong class", code="pkcs11_error"
                )
            return _public_key_from_object(public_obj, key_id)

        public = self._run(op, f"loading {key_id}")
        return Pkcs11Signer(self, key_id, ck_id, ck_label, public)

    def delete(self, key_id: str) -> None:
        ck_id, ck_label = self._parse(key_id)

        def op(session: pkcs11.Session, _epoch: int) -> None:
            found = [
                obj
                for object_class in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY)
                for obj in session.get_objects(
                    {Attribute.CLASS: object_class, Attribute.ID: ck_id, Attribute.LABEL: ck_label}
                )
            ]
            if not found:
                raise KeyStoreError(
                    f"key {key_id} not found on the token", code="key_not_found", key_id=key_id
                )
            for obj in found:
                obj.destroy()
            # Handles of destroyed objects may be reused: make every signer look its key up again.
            self._token.epoch += 1

        self._run(op, f"deleting {key_id}")

    def close(self) -> None:
        """Release this store; the shared session is logged out when its last store closes."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        _release_token(self._token)

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"Pkcs11KeyStore({self._config!r}, {state})"
