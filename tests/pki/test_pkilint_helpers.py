"""The shared pkilint helpers are not vacuous, and the large-OID-arc workaround is needed."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from pkilint import loader
from pkilint.document import SubstrateDecodingFailedError

from fleettrust.pki import new_serial
from tests.pkilint_helpers import (
    assert_pkilint_clean_cert,
    assert_pkilint_clean_crl,
    assert_pkilint_clean_ocsp,
)

from .conftest import NOW, Hierarchy, device_key


def test_fasder_rejects_uuid_oid_arcs(hierarchy: Hierarchy) -> None:
    """Plain pkilint cannot decode device certificates (128-bit arc under 2.25).

    If this starts failing, pyasn1-fasder learned large arcs and the fallback in
    tests/pkilint_helpers.py can be removed.
    """
    der = hierarchy.batch_devices["p256"].public_bytes(serialization.Encoding.DER)
    with pytest.raises(SubstrateDecodingFailedError, match="larger than 32-bits"):
        loader.RFC5280CertificateDocumentLoader().load_der_document(der, "device")


def _bad_leaf(h: Hierarchy) -> bytes:
    issuer_ski = h.fleet.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    key = device_key("p256")
    builder = (
        x509.CertificateBuilder()
        .issuer_name(h.fleet.subject)
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "bad")]))
        .public_key(key)
        .serial_number(new_serial())
        .not_valid_before(NOW)
        .not_valid_after(NOW + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("*.bad.example")]), critical=False)
    )
    return h.fleet_signer.sign_certificate(builder).public_bytes(serialization.Encoding.PEM)


def test_cert_helper_reports_errors_and_honours_allowed(hierarchy: Hierarchy) -> None:
    pem = _bad_leaf(hierarchy)
    with pytest.raises(AssertionError, match=r"ERROR pkix\.invalid_domain_name_syntax"):
        assert_pkilint_clean_cert(pem)
    findings = assert_pkilint_clean_cert(pem, allowed={"pkix.invalid_domain_name_syntax"})
    assert any(code == "pkix.invalid_domain_name_syntax" for _, code, _ in findings)


def test_crl_helper(hierarchy: Hierarchy) -> None:
    h = hierarchy
    issuer_ski = h.batch.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    revoked = (
        x509.RevokedCertificateBuilder()
        .serial_number(h.batch_devices["p256"].serial_number)
        .revocation_date(NOW)
        .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), critical=False)
        .build()
    )
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(h.batch.subject)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(days=1))
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
            critical=False,
        )
        .add_extension(x509.CRLNumber(1), critical=False)
        .add_revoked_certificate(revoked)
    )
    crl = h.batch_signer.sign_crl(builder)
    assert_pkilint_clean_crl(crl.public_bytes(serialization.Encoding.DER))
    assert_pkilint_clean_crl(crl.public_bytes(serialization.Encoding.PEM))


def test_ocsp_helper(hierarchy: Hierarchy) -> None:
    h = hierarchy
    # The fleet CA answers for its own child (the factory CA), signing itself.
    builder = (
        ocsp.OCSPResponseBuilder()
        .add_response(
            cert=h.factory0,
            issuer=h.fleet,
            algorithm=hashes.SHA256(),
            cert_status=ocsp.OCSPCertStatus.GOOD,
            this_update=NOW,
            next_update=NOW + dt.timedelta(hours=12),
            revocation_time=None,
            revocation_reason=None,
        )
        .responder_id(ocsp.OCSPResponderEncoding.HASH, h.fleet)
    )
    # OCSP response signing is not part of the Signer protocol (yet): use the raw test key.
    response = builder.sign(h.fleet_signer.private_key, hashes.SHA384())
    assert_pkilint_clean_ocsp(response.public_bytes(serialization.Encoding.DER))
