"""Signed tree heads: the RFC 6962 signed bytes, the DigitallySigned wrapper, JSON, refusals."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust.ledger import merkle
from fleettrust.ledger.sth import (
    SignedTreeHead,
    TreeHeadError,
    log_id_of,
    sign_tree_head,
    tree_head_input,
    verify_sth,
)


def _signer(key: ec.EllipticCurvePrivateKey):  # type: ignore[no-untyped-def]
    return lambda data: key.sign(data, ec.ECDSA(hashes.SHA256()))


def test_signed_bytes_are_rfc6962_tree_head_signature() -> None:
    root = merkle.leaf_hash(b"x")
    raw = tree_head_input(7, 1_700_000_000_123, root)
    assert len(raw) == 50
    assert raw[:2] == b"\x00\x01"  # v1, tree_hash
    assert struct.unpack(">QQ", raw[2:18]) == (1_700_000_000_123, 7)
    assert raw[18:] == root


def test_sign_verify_roundtrip_and_refusals() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    root = merkle.leaf_hash(b"x")
    sth = sign_tree_head(_signer(key), log_id_of(key.public_key()), 3, 1000, root)
    assert sth.signature[:2] == b"\x04\x03"  # sha256, ecdsa
    assert struct.unpack(">H", sth.signature[2:4])[0] == len(sth.signature) - 4
    again = SignedTreeHead.from_json(sth.to_json())
    assert again == sth
    verify_sth(again, key.public_key())
    with pytest.raises(TreeHeadError, match="not from the log of this public key") as e1:
        verify_sth(sth, other.public_key())
    assert e1.value.code == "wrong_log"
    forged = sign_tree_head(_signer(other), log_id_of(key.public_key()), 3, 1000, root)
    with pytest.raises(TreeHeadError, match="signature is not valid") as e2:
        verify_sth(forged, key.public_key())
    assert e2.value.code == "bad_signature"
    for changed in (SignedTreeHead(4, 1000, root, sth.signature, sth.log_id),
                    SignedTreeHead(3, 1001, root, sth.signature, sth.log_id),
                    SignedTreeHead(3, 1000, merkle.EMPTY_ROOT, sth.signature, sth.log_id)):
        with pytest.raises(TreeHeadError, match="signature is not valid"):
            verify_sth(changed, key.public_key())
    with pytest.raises(TreeHeadError, match="length"):
        verify_sth(SignedTreeHead(3, 1000, root, sth.signature + b"\x00", sth.log_id),
                   key.public_key())


@pytest.mark.parametrize("bad", [
    {},
    {"tree_size": -1, "timestamp": 0, "sha256_root_hash": "AA==", "tree_head_signature": "",
     "log_id": ""},
    {"tree_size": 1, "timestamp": 0, "sha256_root_hash": "AA==", "tree_head_signature": "",
     "log_id": ""},
    {"tree_size": 1, "timestamp": 0, "sha256_root_hash": "!!", "tree_head_signature": "",
     "log_id": ""},
    [1, 2],
])
def test_malformed_json_is_refused(bad: object) -> None:
    with pytest.raises(TreeHeadError):
        SignedTreeHead.from_json(bad)
