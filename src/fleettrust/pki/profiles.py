"""Certificate profiles: what every fleettrust certificate contains.

Hierarchy::

    offline root CA ─> fleet CA ─> factory issuing CA ─┬─> device certificates
                          │                            └─> batch CA ─> device certificates
                          ├─> device gateway TLS server certificate
                          └─> OCSP responder certificates (any CA can have its own)

Common to every profile (RFC 5280):

* X.509 v3; subject ``O=<organization>, CN=<name>``; serial chosen by the caller
  (:func:`fleettrust.pki.serials.new_serial`), 1 <= serial < 2**159;
* notBefore = ``now`` - 5 minutes (clock skew), but never before the issuer's notBefore;
  notAfter = ``now`` + ``validity_days``, capped at the issuer's notAfter (every certificate,
  CA or not, ends no later than its issuer);
* subjectKeyIdentifier (RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey BIT STRING);
  authorityKeyIdentifier with only keyIdentifier, copied from the issuer's SKI;
* the signature algorithm is the signer's business (ECDSA with SHA-256 for P-256 keys,
  SHA-384 for P-384).

Profiles:

* root: self-signed; basicConstraints cA critical (optional pathLen); keyUsage keyCertSign,
  cRLSign critical; SKI; AKI = own SKI.
* intermediate CA (fleet, factory, batch): basicConstraints cA critical with pathLen;
  keyUsage digitalSignature (so it may sign OCSP responses itself), keyCertSign, cRLSign
  critical; CRL distribution point and AIA when URLs are given. The issuer's pathLen and
  keyUsage are checked so no profile can produce an invalid path.
* device (:class:`DeviceProfile`): basicConstraints cA=FALSE critical; keyUsage
  digitalSignature (+keyEncipherment for RSA keys) critical; EKU clientAuth; subjectAltName
  (non-critical, the subject is not empty) holding one RFC 4108 ``hardwareModuleName``
  otherName ``{hwType = FLEETTRUST_ARC.2, hwSerialNum = UTF-8 device id}``; CRL DP; AIA
  (OCSP + caIssuers); fleettrust device-binding extension (non-critical).
* TLS server: like device, with EKU serverAuth and dNSName (fully qualified, no wildcards)
  and iPAddress SANs; CN = the first DNS name (else the first IP address).
* OCSP responder: EKU OCSPSigning, id-pkix-ocsp-nocheck, keyUsage digitalSignature, at most
  :data:`MAX_OCSP_RESPONDER_VALIDITY_DAYS` days, no revocation pointers.

Subject public keys must pass :func:`fleettrust.pki.csr.check_key_allowed`.

This module is pure: no I/O, no clock (``now`` is an argument, timezone-aware), no database and
no authorisation. It does not choose serials, URLs or lifetimes; callers pass them in.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import unicodedata
import urllib.parse
from collections.abc import Sequence
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
)

from fleettrust.errors import ValidationError
from fleettrust.pki import _der
from fleettrust.pki.csr import check_key_allowed
from fleettrust.pki.extensions import device_binding_extension
from fleettrust.pki.oids import HARDWARE_MODULE_NAME, HW_TYPE
from fleettrust.pki.serials import is_valid_serial, new_serial
from fleettrust.signing.base import Signer

CLOCK_SKEW: Final = dt.timedelta(minutes=5)
DEFAULT_ROOT_VALIDITY_DAYS: Final = 9125
DEFAULT_OCSP_RESPONDER_VALIDITY_DAYS: Final = 30
MAX_OCSP_RESPONDER_VALIDITY_DAYS: Final = 90
NAME_MAX_CHARS: Final = 64  # ub-common-name / ub-organization-name (RFC 5280 appendix A)
URL_MAX_CHARS: Final = 2048

#: Device identifiers: also the CN and the hwSerialNum of device certificates.
DEVICE_ID_RE: Final = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_DEVICE_ID: Final = re.compile(DEVICE_ID_RE)
_DNS_LABEL: Final = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_DNS_TLD: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,61}[a-z]")

_KU_CA: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_KU_ROOT: Final = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
_KU_SIGN: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_KU_SIGN_RSA: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=True,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)

_EXT_KU_SIGN: Final = x509.Extension(ExtensionOID.KEY_USAGE, True, _KU_SIGN)
_EXT_KU_SIGN_RSA: Final = x509.Extension(ExtensionOID.KEY_USAGE, True, _KU_SIGN_RSA)
_EXT_BC_EE: Final = x509.Extension(
    ExtensionOID.BASIC_CONSTRAINTS, True, x509.BasicConstraints(ca=False, path_length=None)
)
_EXT_EKU_CLIENT: Final = x509.Extension(
    ExtensionOID.EXTENDED_KEY_USAGE, False, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
)
_HW_TYPE_DER: Final = _der.oid(HW_TYPE.dotted_string)
_CRL_EXT_CACHE_MAX: Final = 256


# --------------------------------------------------------------------------- helpers


def _fail(message: str, code: str = "profile_invalid", **details: object) -> ValidationError:
    return ValidationError(message, code=code, **details)


def _require_aware(now: dt.datetime) -> dt.datetime:
    if not isinstance(now, dt.datetime) or now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(dt.UTC)


def _check_name_part(value: str, what: str) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= NAME_MAX_CHARS:
        raise _fail(f"{what} must be 1..{NAME_MAX_CHARS} characters")
    if value != value.strip() or any(unicodedata.category(c)[0] == "C" for c in value):
        raise _fail(f"{what} must not contain control characters or surrounding whitespace")
    return value


def _subject(organization: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(
                NameOID.ORGANIZATION_NAME, _check_name_part(organization, "organization")
            ),
            x509.NameAttribute(NameOID.COMMON_NAME, _check_name_part(common_name, "common name")),
        ]
    )


def _distinct_subject(
    organization: str, common_name: str, issuer_cert: x509.Certificate
) -> x509.Name:
    """Subject name, refused if equal to the issuer's (a self-issued certificate would change
    path-length semantics and confuse path building)."""
    subject = _subject(organization, common_name)
    if subject == issuer_cert.subject:
        raise _fail(
            f"subject name {subject.rfc4514_string()!r} equals the issuer's name",
            code="subject_equals_issuer",
        )
    return subject


def _check_serial(serial: int) -> None:
    if isinstance(serial, bool) or not isinstance(serial, int) or not is_valid_serial(serial):
        raise _fail("serial must be an integer with 1 <= serial < 2**159", code="invalid_serial")


def _check_days(validity_days: int) -> None:
    if isinstance(validity_days, bool) or not isinstance(validity_days, int) or validity_days <= 0:
        raise _fail("validity_days must be a positive integer")


def _check_url(url: str, what: str) -> str:
    if not isinstance(url, str) or not url or len(url) > URL_MAX_CHARS:
        raise _fail(f"{what} must be a URL of 1..{URL_MAX_CHARS} characters")
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        raise _fail(f"{what} must be ASCII without whitespace (percent-encode it): {url!r}")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _fail(f"{what} must be an absolute http:// or https:// URL: {url!r}")
    return url


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ski(key: CertificatePublicKeyTypes) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _issuer_ski(issuer_cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return _ski(issuer_cert.public_key())


def _aki_for(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_issuer_ski(issuer_cert))


def _check_issuer(issuer_signer: Signer, issuer_cert: x509.Certificate) -> x509.BasicConstraints:
    """The issuer must be a CA allowed to sign certificates, holding the signer's key."""
    try:
        bc = issuer_cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise _fail(
            "issuer certificate is not a CA (basicConstraints cA is not TRUE)", code="issuer_not_ca"
        )
    try:
        ku = issuer_cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if ku is not None and not ku.key_cert_sign:
        raise _fail("issuer certificate's keyUsage lacks keyCertSign", code="issuer_not_ca")
    if _spki(issuer_signer.public_key()) != _spki(issuer_cert.public_key()):
        raise _fail(
            "issuer signer's key does not match the issuer certificate's public key",
            code="issuer_key_mismatch",
        )
    return bc


def _window(
    now: dt.datetime,
    validity_days: int,
    issuer_cert: x509.Certificate | None,
) -> tuple[dt.datetime, dt.datetime]:
    now = _require_aware(now).replace(microsecond=0)
    _check_days(validity_days)
    not_before = now - CLOCK_SKEW
    not_after = now + dt.timedelta(days=validity_days)
    if issuer_cert is not None:
        issuer_nb = issuer_cert.not_valid_before_utc
        issuer_na = issuer_cert.not_valid_after_utc
        if not issuer_nb <= now <= issuer_na:
            raise _fail(
                f"issuer certificate is not valid at {now.isoformat()} "
                f"(valid {issuer_nb.isoformat()} .. {issuer_na.isoformat()})",
                code="issuer_not_valid",
            )
        not_before = max(not_before, issuer_nb)
        not_after = min(not_after, issuer_na)
    return not_before, not_after


def _crl_dp(url: str) -> x509.CRLDistributionPoints:
    return x509.CRLDistributionPoints(
        [
            x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(_check_url(url, "crl_url"))],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
        ]
    )


def _aia(
    ocsp_url: str | None, ca_issuers_url: str | None
) -> x509.AuthorityInformationAccess | None:
    descriptions: list[x509.AccessDescription] = []
    if ocsp_url is not None:
        descriptions.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.OCSP,
                x509.UniformResourceIdentifier(_check_url(ocsp_url, "ocsp_url")),
            )
        )
    if ca_issuers_url is not None:
        descriptions.append(
            x509.AccessDescription(
                AuthorityInformationAccessOID.CA_ISSUERS,
                x509.UniformResourceIdentifier(_check_url(ca_issuers_url, "ca_issuers_url")),
            )
        )
    return x509.AuthorityInformationAccess(descriptions) if descriptions else None


def _ee_key_usage(public_key: CertificatePublicKeyTypes) -> x509.Extension[x509.KeyUsage]:
    return _EXT_KU_SIGN_RSA if isinstance(public_key, rsa.RSAPublicKey) else _EXT_KU_SIGN


def _ext(value: x509.ExtensionType, critical: bool = False) -> x509.Extension[x509.ExtensionType]:
    return x509.Extension(value.oid, critical, value)


def _builder(
    *,
    issuer_name: x509.Name,
    subject_name: x509.Name,
    public_key: CertificatePublicKeyTypes,
    serial: int,
    window: tuple[dt.datetime, dt.datetime],
    extensions: list[x509.Extension[x509.ExtensionType]],
) -> x509.CertificateBuilder:
    builder = (
        x509.CertificateBuilder()
        .issuer_name(issuer_name)
        .subject_name(subject_name)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(window[0])
        .not_valid_after(window[1])
    )
    for ext in extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    return builder


def _revocation_extensions(
    crl_url: str | None, ocsp_url: str | None, ca_issuers_url: str | None
) -> list[x509.Extension[x509.ExtensionType]]:
    out: list[x509.Extension[x509.ExtensionType]] = []
    if crl_url is not None:
        out.append(_ext(_crl_dp(crl_url)))
    aia = _aia(ocsp_url, ca_issuers_url)
    if aia is not None:
        out.append(_ext(aia))
    return out


# --------------------------------------------------------------------------- CA profiles


def build_root_certificate(
    signer: Signer,
    *,
    common_name: str,
    organization: str,
    now: dt.datetime,
    validity_days: int = DEFAULT_ROOT_VALIDITY_DAYS,
    path_length: int | None = None,
    serial: int | None = None,
) -> x509.Certificate:
    """Self-signed root CA certificate for ``signer``'s key (serial random unless given)."""
    if path_length is not None and (isinstance(path_length, bool) or path_length < 0):
        raise _fail("path_length must be None or a non-negative integer")
    serial = new_serial() if serial is None else serial
    _check_serial(serial)
    public_key = signer.public_key()
    check_key_allowed(public_key)
    name = _subject(organization, common_name)
    ski = _ski(public_key)
    builder = _builder(
        issuer_name=name,
        subject_name=name,
        public_key=public_key,
        serial=serial,
        window=_window(now, validity_days, None),
        extensions=[
            _ext(x509.BasicConstraints(ca=True, path_length=path_length), critical=True),
            _ext(_KU_ROOT, critical=True),
            _ext(ski),
            _ext(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)),
        ],
    )
    return signer.sign_certificate(builder)


def build_ca_csr(
    signer: Signer, *, common_name: str, organization: str
) -> x509.CertificateSigningRequest:
    """PKCS#10 request (subject ``O, CN``) for a CA key, to carry it to its (offline) issuer."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        _subject(organization, common_name)
    )
    return signer.sign_csr(builder)


def issue_ca_certificate(
    issuer_signer: Signer,
    issuer_cert: x509.Certificate,
    subject_public_key: CertificatePublicKeyTypes,
    *,
    common_name: str,
    organization: str,
    path_length: int | None,
    serial: int,
    now: dt.datetime,
    validity_days: int,
    crl_url: str | None,
    ocsp_url: str | None,
    ca_issuers_url: str | None,
) -> x509.Certificate:
    """Intermediate CA certificate (fleet, factory or batch CA) signed by ``issuer_signer``.

    Raises ValidationError ``path_length_exceeded`` if the issuer's pathLenConstraint does not
    leave room for this CA (or for the requested ``path_length``).
    """
    issuer_bc = _check_issuer(issuer_signer, issuer_cert)
    if path_length is not None and (isinstance(path_length, bool) or path_length < 0):
        raise _fail("path_length must be None or a non-negative integer")
    if issuer_bc.path_length is not None:
        if issuer_bc.path_length == 0:
            raise _fail(
                "issuer CA has pathLenConstraint 0: it may not certify another CA",
                code="path_length_exceeded",
            )
        if path_length is None or path_length > issuer_bc.path_length - 1:
            raise _fail(
                f"issuer CA has pathLenConstraint {issuer_bc.path_length}: the new CA's "
                f"path_length must be at most {issuer_bc.path_length - 1}",
                code="path_length_exceeded",
            )
    _check_serial(serial)
    check_key_allowed(subject_public_key)
    builder = _builder(
        issuer_name=issuer_cert.subject,
        subject_name=_distinct_subject(organization, common_name, issuer_cert),
        public_key=subject_public_key,
        serial=serial,
        window=_window(now, validity_days, issuer_cert),
        extensions=[
            _ext(x509.BasicConstraints(ca=True, path_length=path_length), critical=True),
            _ext(_KU_CA, critical=True),
            _ext(_ski(subject_public_key)),
            _ext(_aki_for(issuer_cert)),
            *_revocation_extensions(crl_url, ocsp_url, ca_issuers_url),
        ],
    )
    return issuer_signer.sign_certificate(builder)


# --------------------------------------------------------------------------- devices


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` if it matches :data:`DEVICE_ID_RE`, else raise ValidationError."""
    if not isinstance(device_id, str) or _DEVICE_ID.fullmatch(device_id) is None:
        raise ValidationError(
            f"device id {device_id!r} must match {DEVICE_ID_RE}", code="invalid_device_id"
        )
    return device_id


def hardware_module_name(device_id: str) -> x509.OtherName:
    """RFC 4108 ``hardwareModuleName`` otherName {hwType = fleettrust, hwSerialNum = id}."""
    return x509.OtherName(
        HARDWARE_MODULE_NAME,
        _der.tlv(
            _der.TAG_SEQUENCE,
            _HW_TYPE_DER + _der.tlv(_der.TAG_OCTET_STRING, device_id.encode("utf-8")),
        ),
    )


class DeviceProfile:
    """Issues device certificates under one issuing CA (factory or batch CA).

    Build it once per issuing CA: everything derived from the issuer (name, AKI, AIA, constant
    extensions, validity bounds) is computed in the constructor, so :meth:`issue` does only the
    per-device work and the signature.
    """

    __slots__ = (
        "_aia",
        "_aki",
        "_crl_cache",
        "_issuer_name",
        "_issuer_not_after",
        "_issuer_not_before",
        "_org",
        "_signer",
        "issuer_cert",
    )

    def __init__(
        self,
        issuer_signer: Signer,
        issuer_cert: x509.Certificate,
        *,
        organization: str,
        ocsp_url: str | None,
        ca_issuers_url: str | None,
    ) -> None:
        _check_issuer(issuer_signer, issuer_cert)
        self._signer = issuer_signer
        self.issuer_cert = issuer_cert
        self._issuer_name = issuer_cert.subject
        self._issuer_not_before = issuer_cert.not_valid_before_utc
        self._issuer_not_after = issuer_cert.not_valid_after_utc
        self._org = x509.NameAttribute(
            NameOID.ORGANIZATION_NAME, _check_name_part(organization, "organization")
        )
        self._aki: x509.Extension[x509.ExtensionType] = _ext(_aki_for(issuer_cert))
        aia = _aia(ocsp_url, ca_issuers_url)
        self._aia: x509.Extension[x509.ExtensionType] | None = None if aia is None else _ext(aia)
        self._crl_cache: dict[str, x509.Extension[x509.ExtensionType]] = {}

    def _crl_extension(self, crl_url: str) -> x509.Extension[x509.ExtensionType]:
        ext = self._crl_cache.get(crl_url)
        if ext is None:
            ext = _ext(_crl_dp(crl_url))
            if len(self._crl_cache) >= _CRL_EXT_CACHE_MAX:
                self._crl_cache.clear()
            self._crl_cache[crl_url] = ext
        return ext

    def issue(
        self,
        public_key: CertificatePublicKeyTypes,
        *,
        device_id: str,
        serial: int,
        now: dt.datetime,
        validity_days: int,
        batch_id: str,
        manifest_sha256: bytes,
        crl_url: str | None,
    ) -> x509.Certificate:
        """Sign one device certificate for ``public_key`` (see the module docstring)."""
        check_device_id(device_id)
        _check_serial(serial)
        _check_days(validity_days)
        check_key_allowed(public_key)
        now = _require_aware(now).replace(microsecond=0)
        if not self._issuer_not_before <= now <= self._issuer_not_after:
            raise _fail(
                f"issuer certificate is not valid at {now.isoformat()}", code="issuer_not_valid"
            )
        not_before = max(now - CLOCK_SKEW, self._issuer_not_before)
        not_after = min(now + dt.timedelta(days=validity_days), self._issuer_not_after)

        extensions: list[x509.Extension[x509.ExtensionType]] = [
            _EXT_BC_EE,
            _ee_key_usage(public_key),
            _EXT_EKU_CLIENT,
            x509.Extension(ExtensionOID.SUBJECT_KEY_IDENTIFIER, False, _ski(public_key)),
            self._aki,
            x509.Extension(
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                False,
                x509.SubjectAlternativeName([hardware_module_name(device_id)]),
            ),
        ]
        if crl_url is not None:
            extensions.append(self._crl_extension(crl_url))
        if self._aia is not None:
            extensions.append(self._aia)
        binding = device_binding_extension(batch_id, manifest_sha256)
        extensions.append(x509.Extension(binding.oid, False, binding))

        # The constructor form skips the per-call re-validation and list copying of the
        # chained builder methods (~18% of issuance time). Everything they would check is
        # checked above; times are passed as naive UTC exactly as those methods store them.
        # tests/pki/test_profiles.py asserts the TBSCertificate equals the chained-API one.
        subject = x509.Name([self._org, x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        if subject == self._issuer_name:
            raise _fail(
                f"device id {device_id!r} would make the subject equal the issuer's name",
                code="subject_equals_issuer",
            )
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer_name,
            subject_name=subject,
            public_key=public_key,
            serial_number=serial,
            not_valid_before=not_before.replace(tzinfo=None),
            not_valid_after=not_after.replace(tzinfo=None),
            extensions=extensions,
        )
        return self._signer.sign_certificate(builder)


# --------------------------------------------------------------------------- TLS server / OCSP


def _check_dns_name(name: str) -> str:
    if not isinstance(name, str) or not name.isascii():
        raise _fail(f"DNS name {name!r} must be ASCII (use the IDNA A-label form)")
    lowered = name.lower()
    if not 1 <= len(lowered) <= 253:
        raise _fail(f"DNS name {name!r} must be 1..253 characters")
    # Fully qualified names only, no wildcards: RFC 5280 dNSName has no wildcard syntax, and
    # pkilint's PKIX profile flags "*.example", single-label names and numeric TLDs.
    labels = lowered.split(".")
    if (
        len(labels) < 2
        or not all(_DNS_LABEL.fullmatch(label) for label in labels)
        or not _DNS_TLD.fullmatch(labels[-1])
    ):
        raise _fail(
            f"DNS name {name!r} is not a fully qualified host name "
            "(LDH labels, a top-level label ending in a letter, no wildcards)"
        )
    return lowered


def issue_server_certificate(
    issuer_signer: Signer,
    issuer_cert: x509.Certificate,
    subject_public_key: CertificatePublicKeyTypes,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
    organization: str,
    serial: int,
    now: dt.datetime,
    validity_days: int,
    crl_url: str | None,
    ocsp_url: str | None,
    ca_issuers_url: str | None,
) -> x509.Certificate:
    """TLS server certificate (device gateway); CN is the first DNS name (else first IP)."""
    _check_issuer(issuer_signer, issuer_cert)
    if isinstance(dns_names, str):
        raise _fail("dns_names must be a sequence of names, not one string")
    names = list(dict.fromkeys(_check_dns_name(n) for n in dns_names))
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for ip in ip_addresses:
        if not isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise _fail(f"ip address {ip!r} must be an ipaddress.IPv4Address/IPv6Address")
        if ip not in ips:
            ips.append(ip)
    if not names and not ips:
        raise _fail("a server certificate needs at least one DNS name or IP address")
    _check_serial(serial)
    check_key_allowed(subject_public_key)
    general_names: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
    general_names += [x509.IPAddress(ip) for ip in ips]
    common_name = names[0] if names else str(ips[0])
    builder = _builder(
        issuer_name=issuer_cert.subject,
        subject_name=_distinct_subject(organization, common_name, issuer_cert),
        public_key=subject_public_key,
        serial=serial,
        window=_window(now, validity_days, issuer_cert),
        extensions=[
            _EXT_BC_EE,
            _ee_key_usage(subject_public_key),
            _ext(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])),
            _ext(_ski(subject_public_key)),
            _ext(_aki_for(issuer_cert)),
            _ext(x509.SubjectAlternativeName(general_names)),
            *_revocation_extensions(crl_url, ocsp_url, ca_issuers_url),
        ],
    )
    return issuer_signer.sign_certificate(builder)


def issue_ocsp_responder_certificate(
    issuer_signer: Signer,
    issuer_cert: x509.Certificate,
    subject_public_key: CertificatePublicKeyTypes,
    *,
    common_name: str,
    organization: str,
    serial: int,
    now: dt.datetime,
    validity_days: int = DEFAULT_OCSP_RESPONDER_VALIDITY_DAYS,
) -> x509.Certificate:
    """Delegated OCSP responder certificate (RFC 6960 §4.2.2.2) for ``issuer_cert``'s CA.

    Short-lived (at most :data:`MAX_OCSP_RESPONDER_VALIDITY_DAYS` days) and marked
    id-pkix-ocsp-nocheck, so it carries no CRL/OCSP pointers of its own.
    """
    _check_issuer(issuer_signer, issuer_cert)
    _check_days(validity_days)
    if validity_days > MAX_OCSP_RESPONDER_VALIDITY_DAYS:
        raise _fail(
            f"OCSP responder certificates are valid at most {MAX_OCSP_RESPONDER_VALIDITY_DAYS} "
            "days (they cannot be revoked: id-pkix-ocsp-nocheck)"
        )
    _check_serial(serial)
    check_key_allowed(subject_public_key)
    builder = _builder(
        issuer_name=issuer_cert.subject,
        subject_name=_distinct_subject(organization, common_name, issuer_cert),
        public_key=subject_public_key,
        serial=serial,
        window=_window(now, validity_days, issuer_cert),
        extensions=[
            _EXT_BC_EE,
            _ee_key_usage(subject_public_key),
            _ext(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING])),
            _ext(x509.OCSPNoCheck()),
            _ext(_ski(subject_public_key)),
            _ext(_aki_for(issuer_cert)),
        ],
    )
    return issuer_signer.sign_certificate(builder)


__all__ = [
    "CLOCK_SKEW",
    "DEVICE_ID_RE",
    "DeviceProfile",
    "build_ca_csr",
    "build_root_certificate",
    "check_device_id",
    "hardware_module_name",
    "issue_ca_certificate",
    "issue_ocsp_responder_certificate",
    "issue_server_certificate",
]
