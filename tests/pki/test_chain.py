"""Path validation (verify_chain and ``openssl verify`` agree) and fingerprints."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from fleettrust.errors import ValidationError
from fleettrust.pki import (
    DeviceProfile,
    build_root_certificate,
    fingerprint_sha256,
    issue_ca_certificate,
    new_serial,
    verify_chain,
)
from tests.pkilint_helpers import assert_pkilint_clean_cert

from .conftest import DEVICE_KEY_KINDS, NOW, ORG, Hierarchy, InMemorySigner, device_key


def _pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def openssl_verify(
    tmp_path: Path,
    root: x509.Certificate,
    chain: Sequence[x509.Certificate],
    leaf: x509.Certificate,
    *extra: str,
    at: dt.datetime = NOW,
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "root.pem").write_bytes(_pem([root]))
    (tmp_path / "chain.pem").write_bytes(_pem(chain))
    (tmp_path / "leaf.pem").write_bytes(_pem([leaf]))
    return subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-attime",
            str(int(at.timestamp())),
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(tmp_path / "chain.pem"),
            *extra,
            str(tmp_path / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def _device_chains(h: Hierarchy) -> list[tuple[str, x509.Certificate, list[x509.Certificate]]]:
    chains = []
    for kind in DEVICE_KEY_KINDS:
        chains.append((f"{kind}-batch", h.batch_devices[kind], [h.batch, h.factory, h.fleet]))
        chains.append((f"{kind}-factory", h.factory0_devices[kind], [h.factory0, h.fleet]))
    return chains


def test_verify_chain_accepts_all_devices(hierarchy: Hierarchy) -> None:
    for _, leaf, chain in _device_chains(hierarchy):
        verify_chain(leaf, chain, hierarchy.root, now=NOW)
        # any order of intermediates, and at the last second of validity
        verify_chain(leaf, list(reversed(chain)), hierarchy.root, now=leaf.not_valid_after_utc)


@pytest.mark.parametrize("purpose", [(), ("-purpose", "sslclient")])
def test_openssl_verify_accepts_all_devices(
    hierarchy: Hierarchy, tmp_path: Path, purpose: tuple[str, ...]
) -> None:
    for name, leaf, chain in _device_chains(hierarchy):
        result = openssl_verify(tmp_path, hierarchy.root, chain, leaf, *purpose)
        assert result.returncode == 0, (name, result.stdout, result.stderr)
        assert result.stdout.strip().endswith(": OK")


def test_server_certificate_chain(hierarchy: Hierarchy, tmp_path: Path) -> None:
    h = hierarchy
    verify_chain(h.server, [h.fleet], h.root, now=NOW, server_name="gateway.fleet.example")
    verify_chain(h.server, [h.fleet], h.root, now=NOW, server_name="gw2.fleet.example")
    verify_chain(h.server, [h.fleet], h.root, now=NOW, server_name="2001:db8::10")
    with pytest.raises(ValidationError, match="subjectAltName"):
        verify_chain(h.server, [h.fleet], h.root, now=NOW, server_name="other.fleet.example")
    result = openssl_verify(
        tmp_path,
        h.root,
        [h.fleet],
        h.server,
        "-purpose",
        "sslserver",
        "-verify_hostname",
        "gateway.fleet.example",
    )
    assert result.returncode == 0, result.stderr


def test_purposes_are_not_interchangeable(hierarchy: Hierarchy, tmp_path: Path) -> None:
    h = hierarchy
    with pytest.raises(ValidationError) as exc:
        verify_chain(h.server, [h.fleet], h.root, now=NOW)  # serverAuth cert as a client
    assert exc.value.code == "chain_invalid"
    assert "EKU" in exc.value.message
    device = h.batch_devices["p256"]
    chain = [h.batch, h.factory, h.fleet]
    with pytest.raises(ValidationError):
        verify_chain(device, chain, h.root, now=NOW, server_name="gateway.fleet.example")
    assert openssl_verify(tmp_path, h.root, chain, device, "-purpose", "sslserver").returncode != 0
    ocsp = openssl_verify(tmp_path, h.root, [h.fleet], h.ocsp_responder, "-purpose", "sslclient")
    assert ocsp.returncode != 0


def _rogue_batch_ca(h: Hierarchy, signer: InMemorySigner) -> x509.Certificate:
    """A CA under the pathLen-0 factory CA, built by hand (the profile refuses to)."""
    ski = x509.SubjectKeyIdentifier.from_public_key(signer.public_key())
    issuer_ski = h.factory0.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .issuer_name(h.factory0.subject)
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORG),
                    x509.NameAttribute(NameOID.COMMON_NAME, "Rogue Batch"),
                ]
            )
        )
        .public_key(signer.public_key())
        .serial_number(new_serial())
        .not_valid_before(NOW - dt.timedelta(minutes=5))
        .not_valid_after(NOW + dt.timedelta(days=100))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
    )
    return h.factory0_signer.sign_certificate(builder)


def test_path_length_violation_is_refused_everywhere(
    hierarchy: Hierarchy, tmp_path: Path, make_signer: Callable[..., InMemorySigner]
) -> None:
    h = hierarchy
    rogue_signer = make_signer()
    # The profile itself refuses to create this CA ...
    with pytest.raises(ValidationError) as exc:
        issue_ca_certificate(
            h.factory0_signer,
            h.factory0,
            rogue_signer.public_key(),
            common_name="Rogue Batch",
            organization=ORG,
            path_length=0,
            serial=new_serial(),
            now=NOW,
            validity_days=100,
            crl_url=None,
            ocsp_url=None,
            ca_issuers_url=None,
        )
    assert exc.value.code == "path_length_exceeded"
    # ... so build it by hand and check both verifiers reject the resulting device.
    rogue = _rogue_batch_ca(h, rogue_signer)
    assert_pkilint_clean_cert(_pem([rogue]))  # the certificate alone is well-formed
    profile = DeviceProfile(
        rogue_signer, rogue, organization=ORG, ocsp_url=None, ca_issuers_url=None
    )
    device = h.issue_device(profile, device_key("p256"), "rogue-device-1", crl_url=None)
    chain = [rogue, h.factory0, h.fleet]

    with pytest.raises(ValidationError) as exc:
        verify_chain(device, chain, h.root, now=NOW)
    assert exc.value.code == "chain_invalid"
    assert "path length" in exc.value.message.lower()

    result = openssl_verify(tmp_path, h.root, chain, device)
    assert result.returncode != 0
    assert "path length constraint exceeded" in (result.stdout + result.stderr)


def test_verify_chain_refusals(
    hierarchy: Hierarchy, make_signer: Callable[..., InMemorySigner]
) -> None:
    h = hierarchy
    device = h.batch_devices["p384"]
    chain = [h.batch, h.factory, h.fleet]
    other_root = build_root_certificate(
        make_signer(), common_name="Example Fleet Root CA", organization=ORG, now=NOW
    )
    cases: list[tuple[list[x509.Certificate], x509.Certificate, dt.datetime]] = [
        (chain, h.root, device.not_valid_after_utc + dt.timedelta(seconds=1)),  # expired
        (chain, h.root, NOW - dt.timedelta(hours=1)),  # before notBefore (now - 5 min)
        ([h.batch, h.fleet], h.root, NOW),  # factory CA missing
        (chain, other_root, NOW),  # same name, different key
    ]
    for intermediates, root, at in cases:
        with pytest.raises(ValidationError) as exc:
            verify_chain(device, intermediates, root, now=at)
        assert exc.value.code == "chain_invalid"
        assert exc.value.message.startswith("certificate chain is invalid: ")
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_chain(device, chain, h.root, now=NOW.replace(tzinfo=None))


def test_fingerprint_matches_openssl(hierarchy: Hierarchy) -> None:
    for cert in (hierarchy.root, hierarchy.batch_devices["ed25519"]):
        out = subprocess.run(
            ["openssl", "x509", "-noout", "-fingerprint", "-sha256"],
            input=_pem([cert]),
            capture_output=True,
            check=True,
        ).stdout.decode()
        assert out.strip().split("=", 1)[1] == fingerprint_sha256(cert)
    fp = fingerprint_sha256(hierarchy.root)
    assert len(fp) == 95
    assert fp == fp.upper()
    assert fp.count(":") == 31
