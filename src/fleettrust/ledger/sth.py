"""Signed tree heads (STH) of the transparency log, and the JSON of proofs and entries.

What this module does:

* The signed bytes are RFC 6962 §3.5's ``TreeHeadSignature``: ``version`` v1 (0),
  ``signature_type`` tree_hash (1), ``timestamp`` (uint64, milliseconds since the epoch),
  ``tree_size`` (uint64) and the 32-byte root hash — 50 bytes, one fixed layout, nothing to
  canonicalise. The signature is ECDSA P-256 with SHA-256 (DER), wrapped as RFC 5246
  ``DigitallySigned`` (hash 4 = sha256, signature 3 = ecdsa, uint16 length), as CT logs do.
* The log is named by its ``log_id``: SHA-256 of the public key's SubjectPublicKeyInfo DER.
* JSON forms (the API's answers and the files ``fleettrust log verify`` reads): an STH is
  ``{"tree_size", "timestamp", "sha256_root_hash", "tree_head_signature", "log_id"}`` with
  bytes in standard base64 (the names of RFC 6962's ``get-sth``); an inclusion proof is
  ``{"leaf_index", "tree_size", "leaf_hash", "audit_path": [...]}``; a consistency proof is
  ``{"first", "second", "consistency": [...]}``.
* :func:`verify_sth` needs nothing but the log's public key.

What it does not do: it holds no private key (signing goes through a ``sign`` callable, the
key store's signer in the server) and does not check proofs (``ledger.merkle``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust.ledger.merkle import HASH_SIZE

SIGNATURE_ALGORITHM = "ecdsa-p256-sha256"
_V1 = 0
_TREE_HASH = 1
_HASH_SHA256 = 4
_SIG_ECDSA = 3


class TreeHeadError(ValueError):
    """An STH (or proof file) is malformed, from another log, or its signature is bad."""

    def __init__(self, message: str, code: str = "bad_tree_head") -> None:
        super().__init__(message)
        self.code = code


def tree_head_input(tree_size: int, timestamp: int, root_hash: bytes) -> bytes:
    """The 50 bytes the log signs (RFC 6962 §3.5 ``TreeHeadSignature``)."""
    if len(root_hash) != HASH_SIZE:
        raise ValueError("root hash must be 32 bytes")
    return struct.pack(">BBQQ", _V1, _TREE_HASH, timestamp, tree_size) + root_hash


def digitally_signed(der_signature: bytes) -> bytes:
    return struct.pack(">BBH", _HASH_SHA256, _SIG_ECDSA, len(der_signature)) + der_signature


def der_from_digitally_signed(blob: bytes) -> bytes:
    if len(blob) < 4:
        raise TreeHeadError("tree_head_signature is truncated", "malformed_signature")
    hash_alg, sig_alg, length = struct.unpack(">BBH", blob[:4])
    if (hash_alg, sig_alg) != (_HASH_SHA256, _SIG_ECDSA):
        raise TreeHeadError(
            f"tree_head_signature uses hash {hash_alg} / signature {sig_alg}; this log signs "
            "with sha256 (4) / ecdsa (3)", "malformed_signature")
    if length != len(blob) - 4:
        raise TreeHeadError("tree_head_signature length does not match its content",
                            "malformed_signature")
    return blob[4:]


def log_id_of(public_key: ec.EllipticCurvePublicKey) -> bytes:
    spki = public_key.public_bytes(serialization.Encoding.DER,
                                   serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(spki).digest()


def load_public_key(pem: bytes) -> ec.EllipticCurvePublicKey:
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError as exc:
        raise TreeHeadError(f"not a PEM public key: {exc}", "bad_public_key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise TreeHeadError("the log's public key must be an ECDSA P-256 key", "bad_public_key")
    return key


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise TreeHeadError(f"{what} must be a base64 string", "malformed")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise TreeHeadError(f"{what} is not valid base64", "malformed") from exc


def _int(obj: Mapping[str, Any], key: str, what: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TreeHeadError(f"{what}: {key!r} must be a non-negative integer", "malformed")
    return value


@dataclass(frozen=True)
class SignedTreeHead:
    tree_size: int
    timestamp: int  # milliseconds since the epoch
    root_hash: bytes
    signature: bytes  # DigitallySigned(ECDSA DER)
    log_id: bytes

    def signed_data(self) -> bytes:
        return tree_head_input(self.tree_size, self.timestamp, self.root_hash)

    def to_json(self) -> dict[str, Any]:
        return {"tree_size": self.tree_size, "timestamp": self.timestamp,
                "sha256_root_hash": b64(self.root_hash),
                "tree_head_signature": b64(self.signature), "log_id": b64(self.log_id)}

    @classmethod
    def from_json(cls, obj: Any, what: str = "STH") -> SignedTreeHead:
        if not isinstance(obj, Mapping):
            raise TreeHeadError(f"{what} is not a JSON object", "malformed")
        root = unb64(obj.get("sha256_root_hash"), f"{what} sha256_root_hash")
        if len(root) != HASH_SIZE:
            raise TreeHeadError(f"{what} sha256_root_hash is not 32 bytes", "malformed")
        return cls(tree_size=_int(obj, "tree_size", what), timestamp=_int(obj, "timestamp", what),
                   root_hash=root,
                   signature=unb64(obj.get("tree_head_signature"), f"{what} tree_head_signature"),
                   log_id=unb64(obj.get("log_id"), f"{what} log_id"))


def sign_tree_head(sign: Callable[[bytes], bytes], log_id: bytes, tree_size: int,
                   timestamp: int, root_hash: bytes) -> SignedTreeHead:
    """``sign`` returns a DER ECDSA P-256/SHA-256 signature (``Signer.sign_bytes``)."""
    der = sign(tree_head_input(tree_size, timestamp, root_hash))
    return SignedTreeHead(tree_size, timestamp, root_hash, digitally_signed(der), log_id)


def verify_sth(sth: SignedTreeHead, public_key: ec.EllipticCurvePublicKey,
               what: str = "STH") -> None:
    """Raise :class:`TreeHeadError` unless ``sth`` is signed by ``public_key``'s log."""
    expected = log_id_of(public_key)
    if sth.log_id != expected:
        raise TreeHeadError(
            f"{what} is from log {sth.log_id.hex()}, not from the log of this public key "
            f"({expected.hex()})", "wrong_log")
    der = der_from_digitally_signed(sth.signature)
    try:
        public_key.verify(der, sth.signed_data(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TreeHeadError(
            f"{what} signature is not valid for this log's public key (tree_size="
            f"{sth.tree_size}, timestamp={sth.timestamp}, root {sth.root_hash.hex()})",
            "bad_signature") from None


@dataclass(frozen=True)
class InclusionProof:
    leaf_index: int
    tree_size: int
    audit_path: tuple[bytes, ...]
    leaf_hash: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"leaf_index": self.leaf_index, "tree_size": self.tree_size,
                               "audit_path": [b64(h) for h in self.audit_path]}
        if self.leaf_hash is not None:
            out["leaf_hash"] = b64(self.leaf_hash)
        return out

    @classmethod
    def from_json(cls, obj: Any) -> InclusionProof:
        if not isinstance(obj, Mapping):
            raise TreeHeadError("inclusion proof is not a JSON object", "malformed")
        path = obj.get("audit_path")
        if not isinstance(path, list):
            raise TreeHeadError("inclusion proof has no audit_path list", "malformed")
        lh = obj.get("leaf_hash")
        return cls(leaf_index=_int(obj, "leaf_index", "inclusion proof"),
                   tree_size=_int(obj, "tree_size", "inclusion proof"),
                   audit_path=tuple(unb64(h, f"audit_path[{i}]") for i, h in enumerate(path)),
                   leaf_hash=None if lh is None else unb64(lh, "leaf_hash"))


@dataclass(frozen=True)
class ConsistencyProof:
    first: int
    second: int
    path: tuple[bytes, ...]

    def to_json(self) -> dict[str, Any]:
        return {"first": self.first, "second": self.second,
                "consistency": [b64(h) for h in self.path]}

    @classmethod
    def from_json(cls, obj: Any) -> ConsistencyProof:
        if not isinstance(obj, Mapping):
            raise TreeHeadError("consistency proof is not a JSON object", "malformed")
        path = obj.get("consistency")
        if not isinstance(path, list):
            raise TreeHeadError("consistency proof has no consistency list", "malformed")
        return cls(first=_int(obj, "first", "consistency proof"),
                   second=_int(obj, "second", "consistency proof"),
                   path=tuple(unb64(h, f"consistency[{i}]") for i, h in enumerate(path)))


def hashes_to_json(hashes: Sequence[bytes]) -> list[str]:
    return [b64(h) for h in hashes]
