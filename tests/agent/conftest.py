"""Fixtures of the agent tests: a test PKI, an enrolled state directory, the protocol stubs.

The HTTPS server used here is tests/agent/stub_gateway.py — a PROTOCOL STUB of
docs/device-protocol.md, not the fleettrust gateway (whose end-to-end tests live elsewhere).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from fleettrust.agent.enroll import enroll, install
from fleettrust.agent.state import AgentState
from fleettrust.pki.manifest import Manifest, normalize_manifest
from tests.agent.pki_helpers import TestPKI
from tests.agent.stub_gateway import StubGateway

MANIFEST = {"cpu_serial": "00000000c0ffee01", "mac_addresses": ["DC:A6:32:01:02:03"],
            "wlan_module_id": "WLAN-7788"}


@dataclass
class Enrolled:
    state_dir: Path
    state: AgentState
    certificate: x509.Certificate
    manifest: Manifest


@pytest.fixture
def test_pki() -> TestPKI:
    return TestPKI()


def enroll_device(test_pki: TestPKI, state_dir: Path, *, validity_days: int = 365,
                  manifest: dict[str, object] | None = None) -> Enrolled:
    m = normalize_manifest(manifest or MANIFEST)
    request = enroll(state_dir, manifest=m)
    response = test_pki.issue_response(request.csr_pem, request.manifest,
                                       validity_days=validity_days)
    state = install(state_dir, response)
    cert = x509.load_pem_x509_certificate(response["devices"][0]["certificate_pem"].encode())
    return Enrolled(state_dir, state, cert, m)


@pytest.fixture
def enrolled(test_pki: TestPKI, tmp_path: Path) -> Enrolled:
    return enroll_device(test_pki, tmp_path / "device")


@pytest.fixture
def gateway(test_pki: TestPKI, tmp_path: Path) -> Iterator[StubGateway]:
    with StubGateway(test_pki, tmp_path) as gw:
        yield gw
