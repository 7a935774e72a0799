"""Device-key signatures: manifest signature and renewal proof, checked independently."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust.agent.identity import (
    FileDeviceKey,
    build_csr,
    make_renew_proof,
    sign_manifest,
    verify_manifest_signature,
    verify_renew_proof,
)
from fleettrust.agent.state import StateStore
from fleettrust.pki.csr import load_csr
from fleettrust.pki.manifest import normalize_manifest
from tests.agent.conftest import Enrolled


def test_manifest_signature_verifies_with_the_certificate_key(enrolled: Enrolled) -> None:
    identity = StateStore(enrolled.state_dir).load()
    signature = base64.b64decode(sign_manifest(identity.key, enrolled.manifest), validate=True)
    # the documented message, built here independently of the agent's helper:
    canonical = json.dumps(enrolled.manifest.to_dict(), sort_keys=True,
                           separators=(",", ":")).encode()
    message = b"fleettrust-manifest-v1\n" + canonical
    public = enrolled.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(signature, message + b" ", ec.ECDSA(hashes.SHA256()))


def test_manifest_signature_is_independent_of_key_order_and_mac_spelling(
        enrolled: Enrolled) -> None:
    identity = StateStore(enrolled.state_dir).load()
    a = normalize_manifest({"wlan_module_id": "WLAN-7788", "mac_addresses": ["dca632010203"],
                            "cpu_serial": "00000000c0ffee01"})
    signature = sign_manifest(identity.key, a)
    assert verify_manifest_signature(enrolled.certificate.public_key(), enrolled.manifest,
                                     signature)
    other = normalize_manifest({"cpu_serial": "00000000c0ffee02"})
    assert not verify_manifest_signature(enrolled.certificate.public_key(), other, signature)
    assert not verify_manifest_signature(enrolled.certificate.public_key(), a, "%%%")


def test_renew_proof_binds_the_csr_to_the_current_key() -> None:
    current, new = FileDeviceKey.generate(), FileDeviceKey.generate()
    csr = build_csr(new, "d-test")
    proof = make_renew_proof(current, csr)
    der = csr.public_bytes(serialization.Encoding.DER)
    message = b"fleettrust-renew-v1\n" + hashlib.sha256(der).digest()
    current.public_key().verify(base64.b64decode(proof), message, ec.ECDSA(hashes.SHA256()))
    assert verify_renew_proof(current.public_key(), der, proof)
    assert not verify_renew_proof(new.public_key(), der, proof)
    other = build_csr(FileDeviceKey.generate(), "d-test").public_bytes(serialization.Encoding.DER)
    assert not verify_renew_proof(current.public_key(), other, proof)
    parsed = load_csr(csr.public_bytes(serialization.Encoding.PEM))  # self-signature checked
    assert parsed.public_key() == new.public_key()


def test_file_key_is_written_0600_and_not_picklable(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import pickle

    key = FileDeviceKey.generate()
    key.write(tmp_path / "key.pem")
    assert (tmp_path / "key.pem").stat().st_mode & 0o777 == 0o600
    assert FileDeviceKey.load(tmp_path / "key.pem").public_key() == key.public_key()
    with pytest.raises(TypeError):
        pickle.dumps(key)
    assert "BEGIN" not in repr(key)
