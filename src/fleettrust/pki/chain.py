"""Certification path verification and certificate fingerprints.

:func:`verify_chain` checks that ``leaf`` chains to ``root`` through ``intermediates`` at the
instant ``now``, using ``cryptography.x509.verification`` (RFC 5280 path validation with the
Web PKI profile of the rustls-webpki/CA-B lineage): every signature, issuer/subject name
chaining, validity at ``now``, basicConstraints cA and pathLenConstraint, keyUsage keyCertSign
on CAs, critical-extension handling, key sizes and the leaf's extended key usage (clientAuth
for device certificates, serverAuth when ``server_name`` is given). Failures raise
:class:`~fleettrust.errors.ValidationError` with code ``chain_invalid`` and the verifier's
reason.

Device certificates name the device only by an RFC 4108 ``hardwareModuleName`` otherName.
The library's default client policy only requires a subjectAltName to be *present* (it does
not match client names), so it accepts them as they are and no hand-written fallback is
needed; the default CA and end-entity extension policies apply unchanged.

This module does not check revocation (CRL/OCSP), which needs fresh external data.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification

from fleettrust.errors import ValidationError

#: Longest path accepted: root, fleet, factory, batch CA, device (+1 spare intermediate).
MAX_CHAIN_DEPTH = 6


def verify_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    root: x509.Certificate,
    *,
    now: dt.datetime,
    server_name: str | None = None,
) -> None:
    """Raise ValidationError ``chain_invalid`` unless ``leaf`` validates up to ``root`` at ``now``.

    Without ``server_name`` the leaf must be a TLS *client* certificate (EKU clientAuth, the
    device profile); with it, a *server* certificate valid for that DNS name or IP address.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    builder = (
        verification.PolicyBuilder()
        .store(verification.Store([root]))
        .time(now)
        .max_chain_depth(MAX_CHAIN_DEPTH)
    )
    try:
        if server_name is None:
            verifier_c = builder.build_client_verifier()
            verifier_c.verify(leaf, list(intermediates))
        else:
            subject: verification.Subject
            try:
                subject = x509.IPAddress(ipaddress.ip_address(server_name))
            except ValueError:
                subject = x509.DNSName(server_name)
            verifier_s = builder.build_server_verifier(subject)
            verifier_s.verify(leaf, list(intermediates))
    except verification.VerificationError as exc:
        raise ValidationError(
            f"certificate chain is invalid: {exc}", code="chain_invalid"
        ) from None


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint as ``AB:CD:…`` (the format of ``openssl x509 -fingerprint -sha256``)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


__all__ = ["MAX_CHAIN_DEPTH", "fingerprint_sha256", "verify_chain"]
