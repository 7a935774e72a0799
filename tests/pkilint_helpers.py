"""pkilint assertions shared by the test suites.

Each helper builds exactly the validator set of the corresponding pkilint console script
(``lint_pkix_cert``, ``lint_pkix_signer_signee_cert_chain``, ``lint_crl -t CRL -p PKIX``,
``lint_ocsp_response``) through pkilint's Python API (in-process: ~100x faster than spawning
the scripts) and fails the test on any FATAL, ERROR or WARNING finding whose code is not in
``allowed``. NOTICE and INFO findings are returned, not asserted.

Large OID arcs: pkilint decodes with pyasn1-fasder, whose native decoder refuses OID arcs
wider than 32 bits ("OID contains arc which is larger than 32-bits"). fleettrust's private arc
is a UUID OID (``2.25.<128-bit integer>``, X.667), so every device certificate trips it even
though the DER is valid (RFC 5280 appendix B only *requires* support for arcs up to 2**28,
X.660 puts no bound on them; OpenSSL and cryptography >= 44 parse them). While linting, the
helpers therefore retry exactly that failure with pyasn1's own DER decoder, which supports
arbitrary arcs, and still refuse trailing data. Every other decoding error is reported as is.
"""

from __future__ import annotations

import base64
import contextlib
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from pkilint import document, loader, pkix, validation
from pkilint.pkix import certificate, crl, extension, name, ocsp
from pkilint.validation import ValidationFindingSeverity as Severity
from pyasn1.codec.der import decoder as pyasn1_der_decoder
from pyasn1.error import PyAsn1Error

_FAILING = (Severity.FATAL, Severity.ERROR, Severity.WARNING)
_BIG_ARC_ERROR = "larger than 32-bits"

__all__ = [
    "assert_pkilint_clean_cert",
    "assert_pkilint_clean_chain",
    "assert_pkilint_clean_crl",
    "assert_pkilint_clean_ocsp",
    "lint_findings",
]


@contextlib.contextmanager
def _large_oid_arcs_supported() -> Iterator[None]:
    fasder_decode: Callable[..., tuple[Any, bytes]] = document.decode_der

    def decode_der(substrate: bytes, asn1Spec: Any) -> tuple[Any, bytes]:  # noqa: N803
        try:
            return fasder_decode(substrate, asn1Spec=asn1Spec)
        except PyAsn1Error as exc:
            if _BIG_ARC_ERROR not in str(exc):
                raise
        decoded, rest = pyasn1_der_decoder.decode(bytes(substrate), asn1Spec=asn1Spec)
        if rest:
            raise PyAsn1Error(f"{len(rest)} trailing octet(s) after the DER value")
        return decoded, b""

    document.decode_der = decode_der
    try:
        yield
    finally:
        document.decode_der = fasder_decode


def _to_der(data: bytes | str, pem_label: str) -> bytes:
    text = data.decode("ascii", "replace") if isinstance(data, bytes) else data
    if isinstance(data, bytes) and not text.lstrip().startswith("-----BEGIN"):
        return data
    match = re.search(
        rf"-----BEGIN {pem_label}-----(.+?)-----END {pem_label}-----", text, re.DOTALL
    )
    if match is None:
        raise ValueError(f"no PEM block labelled {pem_label!r}")
    return base64.b64decode("".join(match.group(1).split()))


def lint_findings(
    results: Iterable[validation.ValidationResult],
) -> list[tuple[Severity, str, str]]:
    """(severity, code, 'validator @ path: message') for every finding in ``results``."""
    out: list[tuple[Severity, str, str]] = []
    for result in results:
        for desc in result.finding_descriptions:
            where = f"{result.validator} @ {result.node.path}"
            message = f"{where}: {desc.message}" if desc.message else where
            out.append((desc.finding.severity, desc.finding.code, message))
    return out


def _assert_clean(
    results: list[validation.ValidationResult], allowed: Iterable[str], what: str
) -> list[tuple[Severity, str, str]]:
    findings = lint_findings(results)
    allowed_codes = set(allowed)
    bad = [f for f in findings if f[0] in _FAILING and f[1] not in allowed_codes]
    if bad:
        lines = "\n".join(f"  {sev.name} {code}: {msg}" for sev, code, msg in bad)
        raise AssertionError(f"pkilint findings for {what}:\n{lines}")
    return findings


def _cert_validator() -> validation.ValidatorContainer:
    # Same construction as pkilint/bin/lint_pkix_cert.py.
    return certificate.create_pkix_certificate_validator_container(
        certificate.create_decoding_validators(
            name.ATTRIBUTE_TYPE_MAPPINGS, extension.EXTENSION_MAPPINGS
        ),
        [
            certificate.create_issuer_validator_container([]),
            certificate.create_validity_validator_container(),
            certificate.create_subject_validator_container([]),
            certificate.create_extensions_validator_container([]),
            certificate.create_spki_validator_container([]),
        ],
    )


def assert_pkilint_clean_cert(
    pem: bytes | str, allowed: Iterable[str] = frozenset()
) -> list[tuple[Severity, str, str]]:
    """``lint_pkix_cert``: no FATAL/ERROR/WARNING finding except codes in ``allowed``."""
    der = _to_der(pem, "CERTIFICATE")
    with _large_oid_arcs_supported():
        doc = loader.RFC5280CertificateDocumentLoader().load_der_document(der, "certificate")
        results = _cert_validator().validate(doc.root)
    return _assert_clean(results, allowed, "certificate")


def assert_pkilint_clean_chain(
    issuer_pem: bytes | str, subject_pem: bytes | str, allowed: Iterable[str] = frozenset()
) -> list[tuple[Severity, str, str]]:
    """``lint_pkix_signer_signee_cert_chain``: names, key ids, policies and the signature."""
    from pkilint.bin import lint_pkix_signer_signee_cert_chain as chain_cli

    cert_loader = loader.RFC5280CertificateDocumentLoader()
    collection: dict[str, document.Document] = {}
    with _large_oid_arcs_supported():
        issuer = cert_loader.load_der_document(
            _to_der(issuer_pem, "CERTIFICATE"), "issuer", "issuer", collection
        )
        collection["issuer"] = issuer
        subject = cert_loader.load_der_document(
            _to_der(subject_pem, "CERTIFICATE"), "subject", "subject", collection
        )
        collection["subject"] = subject
        decoding = chain_cli.create_decoder_validation_container()
        results = decoding.validate(issuer.root)
        results += decoding.validate(subject.root)
        results += chain_cli.create_issuer_validation_container().validate(issuer.root)
        results += chain_cli.create_subject_validation_container().validate(subject.root)
    return _assert_clean(results, allowed, "issuer/subject chain")


def assert_pkilint_clean_crl(
    der_or_pem: bytes | str, allowed: Iterable[str] = frozenset()
) -> list[tuple[Severity, str, str]]:
    """``lint_crl -t CRL -p PKIX``."""
    validator = crl.create_pkix_crl_validator_container(
        [
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [
            crl.create_issuer_validator_container([]),
            crl.create_validity_validator_container([]),
            crl.create_extensions_validator_container([]),
        ],
    )
    with _large_oid_arcs_supported():
        doc = loader.RFC5280CertificateListDocumentLoader().load_der_document(
            _to_der(der_or_pem, "X509 CRL"), "crl"
        )
        results = validator.validate(doc.root)
    return _assert_clean(results, allowed, "CRL")


def assert_pkilint_clean_ocsp(
    der: bytes, allowed: Iterable[str] = frozenset()
) -> list[tuple[Severity, str, str]]:
    """``lint_ocsp_response``."""
    validator = ocsp.create_pkix_ocsp_response_validator_container(
        [
            ocsp.create_response_decoder(),
            pkix.create_attribute_decoder(name.ATTRIBUTE_TYPE_MAPPINGS),
            pkix.create_extension_decoder(extension.EXTENSION_MAPPINGS),
        ],
        [],
    )
    with _large_oid_arcs_supported():
        doc = loader.RFC6960OCSPResponseDocumentLoader().load_der_document(der, "ocsp")
        results = validator.validate(doc.root)
    return _assert_clean(results, allowed, "OCSP response")
