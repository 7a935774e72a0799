"""The fleettrust device-binding certificate extension.

Every device certificate carries one non-critical extension binding it to the production batch
it was made in and to the hash of the hardware manifest registered for it
(:func:`fleettrust.pki.manifest.manifest_hash`)::

    FleetTrust-DeviceBinding
      { joint-iso-itu-t(2) uuid(25) 29070838818879774542183493496137085409 module(0) 1 }

    DEFINITIONS EXPLICIT TAGS ::= BEGIN

    id-fleettrust OBJECT IDENTIFIER ::=
      { joint-iso-itu-t(2) uuid(25) 29070838818879774542183493496137085409 }

    id-fleettrust-deviceBinding OBJECT IDENTIFIER ::= { id-fleettrust 1 }

    -- extnValue of the extension; criticality FALSE
    FleetTrustDeviceBinding ::= SEQUENCE {
        version       INTEGER (1),                    -- this is version 1
        batchId       UTF8String (SIZE (1..128)),     -- production batch identifier
        manifestHash  OCTET STRING (SIZE (32))        -- SHA-256 of the canonical manifest JSON
    }

    END

Encoding is DER. :func:`encode_device_binding` writes the (fixed, tiny) structure directly
because it runs once per issued device certificate and pyasn1 would double the cost of
issuance; the tests check its output byte-for-byte against pyasn1. :func:`decode_device_binding`
parses with pyasn1 against the schema and then insists that the input is exactly the canonical
DER of the decoded value (so BER forms, wrong version, constraint violations and trailing bytes
are all refused with :class:`~fleettrust.errors.ValidationError`).

This module does not decide whether a batch or manifest is acceptable; it only (de)serialises.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, constraint, namedtype, univ

from fleettrust.errors import ValidationError
from fleettrust.pki import _der
from fleettrust.pki.oids import DEVICE_BINDING

DEVICE_BINDING_VERSION: Final = 1
BATCH_ID_MAX_CHARS: Final = 128
MANIFEST_HASH_BYTES: Final = 32
# version (3) + batchId (<= 4 + 4*128) + manifestHash (34) + SEQUENCE header (<= 4)
_MAX_DER_BYTES: Final = 600
# C0/C1 control characters and lone surrogates (not encodable as UTF-8).
_FORBIDDEN_CHARS: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

_SCHEMA: Final = univ.Sequence(
    componentType=namedtype.NamedTypes(
        # INTEGER (1) is checked after decoding so the error can name the version found.
        namedtype.NamedType("version", univ.Integer()),
        namedtype.NamedType(
            "batchId",
            char.UTF8String().subtype(
                subtypeSpec=constraint.ValueSizeConstraint(1, BATCH_ID_MAX_CHARS)
            ),
        ),
        namedtype.NamedType(
            "manifestHash",
            univ.OctetString().subtype(
                subtypeSpec=constraint.ValueSizeConstraint(MANIFEST_HASH_BYTES, MANIFEST_HASH_BYTES)
            ),
        ),
    )
)


@dataclass(frozen=True, slots=True)
class DeviceBinding:
    """Decoded content of the device-binding extension."""

    batch_id: str
    manifest_sha256: bytes


def _check(batch_id: str, manifest_sha256: bytes) -> None:
    if not isinstance(batch_id, str) or not 1 <= len(batch_id) <= BATCH_ID_MAX_CHARS:
        raise ValidationError(
            f"batch id must be a string of 1..{BATCH_ID_MAX_CHARS} characters",
            code="device_binding_invalid",
        )
    if _FORBIDDEN_CHARS.search(batch_id):
        raise ValidationError(
            "batch id must not contain control characters or lone surrogates",
            code="device_binding_invalid",
        )
    if not isinstance(manifest_sha256, bytes) or len(manifest_sha256) != MANIFEST_HASH_BYTES:
        raise ValidationError(
            f"manifest hash must be exactly {MANIFEST_HASH_BYTES} bytes (SHA-256)",
            code="device_binding_invalid",
        )


def encode_device_binding(batch_id: str, manifest_sha256: bytes) -> bytes:
    """DER-encode ``FleetTrustDeviceBinding`` (version 1). Raises ValidationError on bad input."""
    _check(batch_id, manifest_sha256)
    return _der.tlv(
        _der.TAG_SEQUENCE,
        _der.small_integer(DEVICE_BINDING_VERSION)
        + _der.tlv(_der.TAG_UTF8_STRING, batch_id.encode("utf-8"))
        + _der.tlv(_der.TAG_OCTET_STRING, manifest_sha256),
    )


def decode_device_binding(der: bytes) -> DeviceBinding:
    """Parse strict DER ``FleetTrustDeviceBinding``; anything else raises ValidationError."""
    if not isinstance(der, bytes):
        raise ValidationError("device binding must be bytes", code="device_binding_invalid")
    if len(der) > _MAX_DER_BYTES:
        raise ValidationError("device binding is too large", code="device_binding_invalid")
    try:
        value, rest = der_decoder.decode(der, asn1Spec=_SCHEMA)
        if rest:
            raise ValidationError(
                f"device binding has {len(rest)} trailing byte(s) after the DER value",
                code="device_binding_invalid",
            )
        version = int(value["version"])
        batch_id = str(value["batchId"])
        manifest = bytes(value["manifestHash"])
    except (PyAsn1Error, ValueError, TypeError, IndexError, KeyError) as exc:
        raise ValidationError(
            f"device binding is not valid FleetTrustDeviceBinding DER: {exc.__class__.__name__}",
            code="device_binding_invalid",
        ) from None
    if version != DEVICE_BINDING_VERSION:
        raise ValidationError(
            f"unsupported device binding version {version}", code="device_binding_invalid"
        )
    if encode_device_binding(batch_id, manifest) != der:
        raise ValidationError(
            "device binding is not in canonical DER form", code="device_binding_invalid"
        )
    return DeviceBinding(batch_id=batch_id, manifest_sha256=manifest)


def device_binding_extension(batch_id: str, manifest_sha256: bytes) -> x509.UnrecognizedExtension:
    """The extension value to add (non-critical) to a device certificate."""
    return x509.UnrecognizedExtension(
        DEVICE_BINDING, encode_device_binding(batch_id, manifest_sha256)
    )


def device_binding_from_certificate(cert: x509.Certificate) -> DeviceBinding | None:
    """Decode the certificate's device-binding extension, or None if it has none."""
    try:
        ext = cert.extensions.get_extension_for_oid(DEVICE_BINDING)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - defensive
        raise ValidationError("unexpected device binding value", code="device_binding_invalid")
    return decode_device_binding(value.value)


__all__ = [
    "DeviceBinding",
    "decode_device_binding",
    "device_binding_extension",
    "device_binding_from_certificate",
    "encode_device_binding",
]
