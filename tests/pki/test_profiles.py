"""Certificate profiles: pkilint-clean output and the exact content of each profile."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Callable
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1_alt_modules import rfc4108

from fleettrust.errors import PolicyError, ValidationError
from fleettrust.pki import (
    CLOCK_SKEW,
    DEVICE_BINDING,
    HARDWARE_MODULE_NAME,
    HW_TYPE,
    DeviceProfile,
    build_ca_csr,
    build_root_certificate,
    issue_ca_certificate,
    issue_ocsp_responder_certificate,
    issue_server_certificate,
    load_csr,
    new_serial,
)
from fleettrust.signing.base import Signer, SignerAlgorithm
from tests.pkilint_helpers import assert_pkilint_clean_cert, assert_pkilint_clean_chain

from .conftest import BASE_URL, DEVICE_KEY_KINDS, NOW, ORG, Hierarchy, InMemorySigner, device_key

# pkilint reports one INFO finding on every certificate,
# pkix.subject_key_identifier_method_1_identified (the SKI is RFC 5280 method 1, as intended).
# No FATAL, ERROR or WARNING finding needs an exception: ``allowed`` is empty everywhere.


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _profile_pairs(h: Hierarchy) -> dict[str, tuple[x509.Certificate, x509.Certificate]]:
    """name -> (certificate, issuer certificate) for every profile in the hierarchy."""
    pairs = {
        "root": (h.root, h.root),
        "fleet-ca": (h.fleet, h.root),
        "factory-ca-pathlen1": (h.factory, h.fleet),
        "factory-ca-pathlen0": (h.factory0, h.fleet),
        "batch-ca": (h.batch, h.factory),
        "server": (h.server, h.fleet),
        "ocsp-responder": (h.ocsp_responder, h.fleet),
    }
    for kind in DEVICE_KEY_KINDS:
        pairs[f"device-{kind}-under-batch"] = (h.batch_devices[kind], h.batch)
        pairs[f"device-{kind}-under-factory"] = (h.factory0_devices[kind], h.factory0)
    return pairs


PROFILE_NAMES = [
    "root",
    "fleet-ca",
    "factory-ca-pathlen1",
    "factory-ca-pathlen0",
    "batch-ca",
    "server",
    "ocsp-responder",
    *(f"device-{k}-under-{p}" for k in DEVICE_KEY_KINDS for p in ("batch", "factory")),
]


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_pkilint_clean(hierarchy: Hierarchy, name: str) -> None:
    cert, issuer = _profile_pairs(hierarchy)[name]
    findings = assert_pkilint_clean_cert(_pem(cert))
    assert {code for _, code, _ in findings} == {"pkix.subject_key_identifier_method_1_identified"}
    assert_pkilint_clean_chain(_pem(issuer), _pem(cert))


ExtT = TypeVar("ExtT", bound=x509.ExtensionType)


def _ext(cert: x509.Certificate, cls: type[ExtT]) -> x509.Extension[ExtT]:
    return cert.extensions.get_extension_for_class(cls)


def _window_ok(cert: x509.Certificate, days: int, issuer: x509.Certificate | None) -> None:
    assert cert.not_valid_before_utc == max(
        NOW - CLOCK_SKEW, issuer.not_valid_before_utc if issuer else NOW - CLOCK_SKEW
    )
    expected_end = NOW + dt.timedelta(days=days)
    if issuer is not None:
        expected_end = min(expected_end, issuer.not_valid_after_utc)
    assert cert.not_valid_after_utc == expected_end


def test_root_profile(hierarchy: Hierarchy) -> None:
    root = hierarchy.root
    assert root.version is x509.Version.v3
    assert root.issuer == root.subject
    assert root.subject.rfc4514_string() == f"CN=Example Fleet Root CA,O={ORG}"
    root.verify_directly_issued_by(root)
    bc = _ext(root, x509.BasicConstraints)
    assert bc.critical
    assert bc.value == x509.BasicConstraints(ca=True, path_length=None)
    ku = _ext(root, x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    assert not ku.value.digital_signature
    ski = _ext(root, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(root.public_key())
    aki = _ext(root, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert aki.authority_cert_issuer is None
    assert isinstance(root.signature_hash_algorithm, hashes.SHA384)  # P-384 signer
    _window_ok(root, 9125, None)
    assert 0 < root.serial_number < 2**159


def test_root_with_path_length_and_serial(make_signer: Callable[..., InMemorySigner]) -> None:
    signer = make_signer()
    root = build_root_certificate(
        signer, common_name="R", organization=ORG, now=NOW, path_length=3, serial=42
    )
    assert root.serial_number == 42
    assert _ext(root, x509.BasicConstraints).value.path_length == 3
    assert isinstance(root.signature_hash_algorithm, hashes.SHA256)  # P-256 signer


def test_intermediate_profiles(hierarchy: Hierarchy) -> None:
    h = hierarchy
    for cert, issuer, path_len, days in (
        (h.fleet, h.root, 2, 3650),
        (h.factory, h.fleet, 1, 1825),
        (h.factory0, h.fleet, 0, 1825),
        (h.batch, h.factory, 0, 1000),
    ):
        cert.verify_directly_issued_by(issuer)
        assert cert.issuer == issuer.subject
        bc = _ext(cert, x509.BasicConstraints)
        assert bc.critical
        assert bc.value == x509.BasicConstraints(ca=True, path_length=path_len)
        ku = _ext(cert, x509.KeyUsage)
        assert ku.critical
        assert ku.value.key_cert_sign
        assert ku.value.crl_sign
        assert ku.value.digital_signature
        aki = _ext(cert, x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == _ext(issuer, x509.SubjectKeyIdentifier).value.digest
        assert aki.authority_cert_issuer is None
        assert aki.authority_cert_serial_number is None
        assert _ext(cert, x509.CRLDistributionPoints).value[0].full_name is not None
        aia = _ext(cert, x509.AuthorityInformationAccess).value
        assert [d.access_method for d in aia] == [
            x509.oid.AuthorityInformationAccessOID.OCSP,
            x509.oid.AuthorityInformationAccessOID.CA_ISSUERS,
        ]
        _window_ok(cert, days, issuer)
    # hash follows the *issuer's* curve
    assert isinstance(h.fleet.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(h.batch.signature_hash_algorithm, hashes.SHA256)


def test_ca_validity_capped_at_issuer(
    hierarchy: Hierarchy, make_signer: Callable[..., InMemorySigner]
) -> None:
    h = hierarchy
    cert = issue_ca_certificate(
        h.factory_signer,
        h.factory,
        make_signer().public_key(),
        common_name="Long Batch",
        organization=ORG,
        path_length=0,
        serial=new_serial(),
        now=NOW,
        validity_days=100000,
        crl_url=None,
        ocsp_url=None,
        ca_issuers_url=None,
    )
    assert cert.not_valid_after_utc == h.factory.not_valid_after_utc
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, x509.CRLDistributionPoints)
    with pytest.raises(x509.ExtensionNotFound):
        _ext(cert, x509.AuthorityInformationAccess)


def _ca_kwargs(**overrides: object) -> dict[str, object]:
    kwargs: dict[str, object] = {
        "common_name": "Some CA",
        "organization": ORG,
        "path_length": 0,
        "serial": new_serial(),
        "now": NOW,
        "validity_days": 10,
        "crl_url": None,
        "ocsp_url": None,
        "ca_issuers_url": None,
    }
    kwargs.update(overrides)
    return kwargs


def test_issue_ca_refuses_path_length_violations(
    hierarchy: Hierarchy, make_signer: Callable[..., InMemorySigner]
) -> None:
    h = hierarchy
    key = make_signer().public_key()
    with pytest.raises(ValidationError) as exc:
        issue_ca_certificate(h.factory0_signer, h.factory0, key, **_ca_kwargs())  # type: ignore[arg-type]
    assert exc.value.code == "path_length_exceeded"
    assert "pathLenConstraint 0" in exc.value.message
    for bad in (None, 1):
        with pytest.raises(ValidationError) as exc:
            issue_ca_certificate(
                h.factory_signer,
                h.factory,
                key,
                **_ca_kwargs(path_length=bad),  # type: ignore[arg-type]
            )
        assert exc.value.code == "path_length_exceeded"


def test_issue_ca_refuses_bad_issuers_and_inputs(
    hierarchy: Hierarchy, make_signer: Callable[..., InMemorySigner]
) -> None:
    h = hierarchy
    key = make_signer().public_key()

    def code(signer: object, issuer: x509.Certificate, **kw: object) -> str:
        with pytest.raises(ValidationError) as exc:
            issue_ca_certificate(signer, issuer, key, **_ca_kwargs(**kw))  # type: ignore[arg-type]
        return exc.value.code

    assert code(h.fleet_signer, h.batch_devices["p256"]) == "issuer_not_ca"
    assert code(h.fleet_signer, h.factory) == "issuer_key_mismatch"
    late = NOW + dt.timedelta(days=5000)
    assert code(h.factory_signer, h.factory, now=late) == "issuer_not_valid"
    assert code(h.factory_signer, h.factory, serial=0) == "invalid_serial"
    assert code(h.factory_signer, h.factory, serial=2**159) == "invalid_serial"
    assert code(h.factory_signer, h.factory, validity_days=0) == "profile_invalid"
    assert code(h.factory_signer, h.factory, common_name="x" * 65) == "profile_invalid"
    assert code(h.factory_signer, h.factory, organization="") == "profile_invalid"
    assert code(h.factory_signer, h.factory, crl_url="ftp://x.example/c.crl") == "profile_invalid"
    assert code(h.factory_signer, h.factory, ocsp_url="http://x.example/a b") == "profile_invalid"
    assert code(h.factory_signer, h.factory, ca_issuers_url="/relative") == "profile_invalid"
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_ca_certificate(
            h.factory_signer,
            h.factory,
            key,
            **_ca_kwargs(now=NOW.replace(tzinfo=None)),  # type: ignore[arg-type]
        )
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    weak = weak_key.public_key()
    with pytest.raises(PolicyError):
        issue_ca_certificate(h.factory_signer, h.factory, weak, **_ca_kwargs())  # type: ignore[arg-type]


def test_build_ca_csr(make_signer: Callable[..., InMemorySigner]) -> None:
    signer = make_signer()
    csr = build_ca_csr(signer, common_name="Example Fleet CA", organization=ORG)
    loaded = load_csr(csr.public_bytes(serialization.Encoding.PEM))
    assert loaded.subject.rfc4514_string() == f"CN=Example Fleet CA,O={ORG}"
    assert loaded.public_key() == signer.public_key()


@pytest.mark.parametrize("kind", DEVICE_KEY_KINDS)
def test_device_profile(hierarchy: Hierarchy, kind: str) -> None:
    h = hierarchy
    cert = h.batch_devices[kind]
    cert.verify_directly_issued_by(h.batch)
    assert cert.subject.rfc4514_string() == f"CN=dev-b-{kind},O={ORG}"
    assert cert.issuer == h.batch.subject
    assert [e.oid for e in cert.extensions] == [
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.CRL_DISTRIBUTION_POINTS,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
        DEVICE_BINDING,
    ]
    critical = {e.oid for e in cert.extensions if e.critical}
    assert critical == {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE}
    assert _ext(cert, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=False, path_length=None
    )
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.digital_signature
    assert ku.key_encipherment is (kind == "rsa2048")
    assert not ku.key_cert_sign
    assert not ku.crl_sign
    assert not ku.content_commitment
    assert not ku.data_encipherment
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _ext(cert, x509.SubjectKeyIdentifier).value == x509.SubjectKeyIdentifier.from_public_key(
        cert.public_key()
    )
    assert (
        _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier
        == _ext(h.batch, x509.SubjectKeyIdentifier).value.digest
    )
    crl_dp = _ext(cert, x509.CRLDistributionPoints).value
    assert crl_dp[0].full_name == [x509.UniformResourceIdentifier(f"{BASE_URL}/crl/batch.crl")]
    _window_ok(cert, 3650, h.batch)  # capped at the batch CA's notAfter
    assert cert.not_valid_after_utc == h.batch.not_valid_after_utc


def test_device_san_is_rfc4108_hardware_module_name(hierarchy: Hierarchy) -> None:
    cert = hierarchy.batch_devices["p256"]
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.critical is False
    (name,) = san.value
    assert isinstance(name, x509.OtherName)
    assert name.type_id == HARDWARE_MODULE_NAME
    decoded, rest = der_decoder.decode(name.value, asn1Spec=rfc4108.HardwareModuleName())
    assert rest == b""
    assert der_encoder.encode(decoded) == name.value  # strict DER
    assert str(decoded["hwType"]) == HW_TYPE.dotted_string
    assert bytes(decoded["hwSerialNum"]) == b"dev-b-p256"


def test_device_profile_tbs_equals_chained_builder(hierarchy: Hierarchy) -> None:
    """The constructor fast path yields exactly what the public chained builder API yields."""
    h = hierarchy
    cert = h.batch_devices["rsa2048"]
    builder = (
        x509.CertificateBuilder()
        .issuer_name(cert.issuer)
        .subject_name(cert.subject)
        .public_key(cert.public_key())
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    again = h.batch_signer.sign_certificate(builder)
    assert again.tbs_certificate_bytes == cert.tbs_certificate_bytes


@pytest.mark.parametrize(
    "device_id",
    ["", "-lead", ".lead", "_lead", "a" * 65, "has space", "dev\n", "dev/1", "dév", "a:b"],
)
def test_device_id_rules(hierarchy: Hierarchy, device_id: str) -> None:
    with pytest.raises(ValidationError) as exc:
        hierarchy.issue_device(hierarchy.batch_profile, device_key("p256"), device_id)
    assert exc.value.code == "invalid_device_id"


@pytest.mark.parametrize("device_id", ["a", "A" * 64, "0", "dev.1_2-3"])
def test_device_id_accepted(hierarchy: Hierarchy, device_id: str) -> None:
    cert = hierarchy.issue_device(hierarchy.batch_profile, device_key("p256"), device_id)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == device_id


def test_device_profile_refusals(
    hierarchy: Hierarchy, make_signer: Callable[..., InMemorySigner]
) -> None:
    h = hierarchy
    weak_key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - on purpose
    weak = weak_key.public_key()
    with pytest.raises(PolicyError):
        h.issue_device(h.batch_profile, weak, "weak-1")
    with pytest.raises(PolicyError):
        h.issue_device(h.batch_profile, ec.generate_private_key(ec.SECP256K1()).public_key(), "k1")
    with pytest.raises(ValidationError) as exc:
        DeviceProfile(make_signer(), h.batch, organization=ORG, ocsp_url=None, ca_issuers_url=None)
    assert exc.value.code == "issuer_key_mismatch"
    with pytest.raises(ValidationError) as exc:
        DeviceProfile(
            h.fleet_signer, h.server, organization=ORG, ocsp_url=None, ca_issuers_url=None
        )
    assert exc.value.code == "issuer_not_ca"
    with pytest.raises(ValidationError) as exc:
        h.batch_profile.issue(
            device_key("p256"),
            device_id="late-1",
            serial=new_serial(),
            now=NOW + dt.timedelta(days=2000),
            validity_days=10,
            batch_id="B",
            manifest_sha256=bytes(32),
            crl_url=None,
        )
    assert exc.value.code == "issuer_not_valid"
    with pytest.raises(ValidationError) as exc:
        h.batch_profile.issue(
            device_key("p256"),
            device_id="hash-1",
            serial=new_serial(),
            now=NOW,
            validity_days=10,
            batch_id="B",
            manifest_sha256=b"short",
            crl_url=None,
        )
    assert exc.value.code == "device_binding_invalid"


def test_device_profile_without_urls(hierarchy: Hierarchy) -> None:
    h = hierarchy
    profile = DeviceProfile(
        h.factory0_signer, h.factory0, organization=ORG, ocsp_url=None, ca_issuers_url=None
    )
    cert = h.issue_device(profile, device_key("ed25519"), "bare-1", crl_url=None)
    oids = {e.oid for e in cert.extensions}
    assert ExtensionOID.CRL_DISTRIBUTION_POINTS not in oids
    assert ExtensionOID.AUTHORITY_INFORMATION_ACCESS not in oids
    assert_pkilint_clean_cert(_pem(cert))


def test_server_profile(hierarchy: Hierarchy) -> None:
    cert = hierarchy.server
    assert cert.subject.rfc4514_string() == f"CN=gateway.fleet.example,O={ORG}"
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = _ext(cert, x509.SubjectAlternativeName)
    assert not san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [
        "gateway.fleet.example",
        "gw2.fleet.example",
    ]
    assert san.value.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("192.0.2.10"),
        ipaddress.ip_address("2001:db8::10"),
    ]
    ku = _ext(cert, x509.KeyUsage).value
    assert ku.digital_signature
    assert not ku.key_encipherment
    _window_ok(cert, 90, hierarchy.fleet)


def _server(h: Hierarchy, **kw: object) -> x509.Certificate:
    kwargs: dict[str, object] = {
        "dns_names": ["gw.fleet.example"],
        "ip_addresses": [],
        "organization": ORG,
        "serial": new_serial(),
        "now": NOW,
        "validity_days": 30,
        "crl_url": None,
        "ocsp_url": None,
        "ca_issuers_url": None,
    }
    kwargs.update(kw)
    return issue_server_certificate(h.fleet_signer, h.fleet, device_key("rsa2048"), **kwargs)  # type: ignore[arg-type]


def test_server_variants(hierarchy: Hierarchy) -> None:
    rsa_server = _server(hierarchy, dns_names=["gw.fleet.example", "gw.example.xn--p1ai"])
    assert _ext(rsa_server, x509.KeyUsage).value.key_encipherment  # RSA key
    assert_pkilint_clean_cert(_pem(rsa_server))
    ip_only = _server(hierarchy, dns_names=[], ip_addresses=[ipaddress.ip_address("10.0.0.1")])
    assert ip_only.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "10.0.0.1"
    assert_pkilint_clean_cert(_pem(ip_only))


@pytest.mark.parametrize(
    "kw",
    [
        {"dns_names": [], "ip_addresses": []},
        {"dns_names": "gw.fleet.example"},
        {"dns_names": ["bad_name.example"]},
        {"dns_names": ["-lead.example"]},
        {"dns_names": ["a..example"]},
        {"dns_names": ["*.gw.fleet.example"]},  # wildcards are not offered
        {"dns_names": ["gw.*.example"]},
        {"dns_names": ["bücher.example"]},
        {"dns_names": ["x" * 64 + ".example"]},
        {"dns_names": ["localhost"]},
        {"dns_names": ["gw.example.123"]},
        {"ip_addresses": ["10.0.0.1"]},
    ],
)
def test_server_refusals(hierarchy: Hierarchy, kw: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        _server(hierarchy, **kw)


def test_ocsp_responder_profile(hierarchy: Hierarchy) -> None:
    cert = hierarchy.ocsp_responder
    assert list(_ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    nocheck = _ext(cert, x509.OCSPNoCheck)
    assert not nocheck.critical
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    assert not ku.value.key_cert_sign
    _window_ok(cert, 30, hierarchy.fleet)
    for absent in (x509.CRLDistributionPoints, x509.AuthorityInformationAccess):
        with pytest.raises(x509.ExtensionNotFound):
            _ext(cert, absent)


def test_ocsp_responder_validity_limit(hierarchy: Hierarchy) -> None:
    h = hierarchy
    with pytest.raises(ValidationError, match="at most 90"):
        issue_ocsp_responder_certificate(
            h.fleet_signer,
            h.fleet,
            device_key("p256"),
            common_name="OCSP",
            organization=ORG,
            serial=new_serial(),
            now=NOW,
            validity_days=91,
        )


def test_subject_never_equals_issuer(
    hierarchy: Hierarchy, make_signer: Callable[..., InMemorySigner]
) -> None:
    h = hierarchy
    with pytest.raises(ValidationError) as exc:
        issue_ca_certificate(
            h.factory_signer,
            h.factory,
            make_signer().public_key(),
            **_ca_kwargs(common_name="Factory Leipzig"),  # type: ignore[arg-type]
        )
    assert exc.value.code == "subject_equals_issuer"
    # A CA whose CN is also a valid device id: that id must not be certified under it.
    ca_signer = make_signer()
    ca = issue_ca_certificate(
        h.fleet_signer,
        h.fleet,
        ca_signer.public_key(),
        **_ca_kwargs(common_name="factory-7"),  # type: ignore[arg-type]
    )
    profile = DeviceProfile(ca_signer, ca, organization=ORG, ocsp_url=None, ca_issuers_url=None)
    with pytest.raises(ValidationError) as exc:
        h.issue_device(profile, device_key("p256"), "factory-7")
    assert exc.value.code == "subject_equals_issuer"
    h.issue_device(profile, device_key("p256"), "factory-8")


def test_in_memory_signer_implements_protocol(hierarchy: Hierarchy) -> None:
    assert isinstance(hierarchy.root_signer, Signer)
    assert hierarchy.root_signer.algorithm is SignerAlgorithm.EC_P384
    assert hierarchy.batch_signer.algorithm is SignerAlgorithm.EC_P256
