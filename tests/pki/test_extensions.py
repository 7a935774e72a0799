"""FleetTrustDeviceBinding: DER round trip, equality with pyasn1, malformed input."""

from __future__ import annotations

import hashlib

import pytest
from cryptography import x509
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import char, namedtype, univ

from fleettrust.errors import ValidationError
from fleettrust.pki import (
    DEVICE_BINDING,
    DeviceBinding,
    decode_device_binding,
    device_binding_extension,
    device_binding_from_certificate,
    encode_device_binding,
)

from .conftest import Hierarchy

HASH = hashlib.sha256(b"manifest").digest()


def _pyasn1_encode(version: int, batch_id: str, digest: bytes) -> bytes:
    seq = univ.Sequence(
        componentType=namedtype.NamedTypes(
            namedtype.NamedType("version", univ.Integer()),
            namedtype.NamedType("batchId", char.UTF8String()),
            namedtype.NamedType("manifestHash", univ.OctetString()),
        )
    )
    seq["version"] = version
    seq["batchId"] = batch_id
    seq["manifestHash"] = digest
    return bytes(der_encoder.encode(seq))


@pytest.mark.parametrize("batch_id", ["B", "B-2025-06-001", "Charge 7 – Linie 3 ✓", "x" * 128])
def test_round_trip_and_matches_pyasn1(batch_id: str) -> None:
    der = encode_device_binding(batch_id, HASH)
    assert der == _pyasn1_encode(1, batch_id, HASH)
    assert decode_device_binding(der) == DeviceBinding(batch_id=batch_id, manifest_sha256=HASH)


def test_known_encoding() -> None:
    der = encode_device_binding("b1", bytes(32))
    assert der == bytes.fromhex("3029020101" + "0c026231" + "0420" + "00" * 32)


@pytest.mark.parametrize(
    ("batch_id", "digest"),
    [
        ("", HASH),
        ("x" * 129, HASH),
        ("bad\nid", HASH),
        ("ok", HASH[:31]),
        ("ok", HASH + b"\x00"),
    ],
)
def test_encode_rejects_invalid(batch_id: str, digest: bytes) -> None:
    with pytest.raises(ValidationError) as exc:
        encode_device_binding(batch_id, digest)
    assert exc.value.code == "device_binding_invalid"


def _decode_error(der: bytes) -> ValidationError:
    with pytest.raises(ValidationError) as exc:
        decode_device_binding(der)
    assert exc.value.code == "device_binding_invalid"
    return exc.value


def test_decode_rejects_wrong_version() -> None:
    err = _decode_error(_pyasn1_encode(2, "b1", HASH))
    assert "version 2" in err.message


def test_decode_rejects_trailing_bytes() -> None:
    err = _decode_error(encode_device_binding("b1", HASH) + b"\x00")
    assert "trailing" in err.message


@pytest.mark.parametrize(
    "der",
    [
        b"",
        b"\x00",
        b"garbage that is not DER",
        b"\x30\x03\x02\x01\x01",  # missing fields
        bytes.fromhex("3080020101" + "0c026231" + "0420" + "00" * 32 + "0000"),  # BER indefinite
        _pyasn1_encode(1, "b1", HASH[:16]),  # hash too short
        _pyasn1_encode(1, "", HASH),  # empty batch id
        _pyasn1_encode(1, "x" * 129, HASH),  # batch id too long
        bytes.fromhex("302a02020001" + "0c026231" + "0420" + "00" * 32),  # non-minimal INTEGER
        bytes.fromhex("308129" + "020101" + "0c026231" + "0420" + "00" * 32),  # long-form length
        bytes.fromhex("3029020101" + "0c02ff31" + "0420" + "00" * 32),  # invalid UTF-8
        bytes(1000),
    ],
)
def test_decode_rejects_malformed(der: bytes) -> None:
    _decode_error(der)


def test_extension_value_and_certificate(hierarchy: Hierarchy) -> None:
    ext = device_binding_extension("B-2025-06-001", HASH)
    assert isinstance(ext, x509.UnrecognizedExtension)
    assert ext.oid == DEVICE_BINDING
    assert decode_device_binding(ext.value).batch_id == "B-2025-06-001"

    device = hierarchy.batch_devices["p256"]
    binding = device_binding_from_certificate(device)
    assert binding == DeviceBinding("B-2025-06-001", hierarchy.manifest_sha256)
    assert device.extensions.get_extension_for_oid(DEVICE_BINDING).critical is False
    assert device_binding_from_certificate(hierarchy.root) is None
