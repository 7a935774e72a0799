"""PKCS#11 (SoftHSM2) device keys: enrollment works, signatures verify, mTLS is refused
honestly (Python's ssl cannot use a token key for the handshake)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleettrust.agent.enroll import enroll, install
from fleettrust.agent.identity import TokenDeviceKey, sign_manifest, verify_manifest_signature
from fleettrust.agent.runner import Agent, AgentConfig
from fleettrust.agent.state import StateError, StateStore
from fleettrust.pki.csr import load_csr
from fleettrust.pki.manifest import normalize_manifest
from tests.agent.pki_helpers import TestPKI
from tests.softhsm import TEST_USER_PIN, make_softhsm_token, softhsm_available

pytestmark = [pytest.mark.pkcs11,
              pytest.mark.skipif(not softhsm_available(), reason="SoftHSM2 not installed")]


def test_token_key_enrollment(tmp_path: Path) -> None:
    config = make_softhsm_token(tmp_path, "fleettrust-agent-test")
    manifest = normalize_manifest({"cpu_serial": "TOKEN-1"})
    state_dir = tmp_path / "dev"
    request = enroll(state_dir, manifest=manifest, pkcs11=config)
    state = StateStore(state_dir).read()
    assert state.key.kind == "pkcs11"
    assert "pin" not in json.dumps(state.to_json()).lower()
    assert not list(state_dir.glob("key-*.pem"))  # no key file in token mode
    csr = load_csr(request.csr_pem.encode())
    with pytest.raises(StateError) as info:
        StateStore(state_dir).load()  # no PIN given
    assert info.value.code == "pkcs11_pin_required"
    identity = StateStore(state_dir).load(pkcs11_pin=TEST_USER_PIN)
    assert isinstance(identity.key, TokenDeviceKey)
    assert identity.key.public_key() == csr.public_key()
    signature = sign_manifest(identity.key, manifest)
    assert verify_manifest_signature(csr.public_key(), manifest, signature)

    test_pki = TestPKI()
    install(state_dir, test_pki.issue_response(request.csr_pem, request.manifest),
            pkcs11_pin=TEST_USER_PIN)
    agent = Agent(AgentConfig(state_dir=state_dir, gateway_url="https://127.0.0.1:1",
                              pkcs11_pin=TEST_USER_PIN))
    with pytest.raises(StateError) as info:
        agent.start()
    assert info.value.code == "tls_key_unavailable"
