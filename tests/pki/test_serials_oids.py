"""Serial numbers, OIDs and the hand-written DER encoders (checked against pyasn1)."""

from __future__ import annotations

import pytest
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import char, univ
from pyasn1_alt_modules import rfc4108

from fleettrust.pki import _der, new_serial, oids
from fleettrust.pki.serials import is_valid_serial


def test_new_serial_is_positive_159_bit_and_random() -> None:
    serials = [new_serial() for _ in range(2000)]
    assert all(0 < s < 2**159 for s in serials)
    assert len(set(serials)) == len(serials)
    # 159 random bits: some serials use the top bits, none exceeds 20 DER octets.
    assert max(s.bit_length() for s in serials) == 159
    assert all(len(der_encoder.encode(univ.Integer(s))) <= 22 for s in serials)


def test_is_valid_serial_bounds() -> None:
    assert is_valid_serial(1)
    assert is_valid_serial(2**159 - 1)
    assert not is_valid_serial(0)
    assert not is_valid_serial(-5)
    assert not is_valid_serial(2**159)


def test_oids() -> None:
    assert oids.FLEETTRUST_ARC.dotted_string == "2.25.29070838818879774542183493496137085409"
    assert oids.DEVICE_BINDING.dotted_string == oids.FLEETTRUST_ARC.dotted_string + ".1"
    assert oids.HW_TYPE.dotted_string == oids.FLEETTRUST_ARC.dotted_string + ".2"
    assert oids.HARDWARE_MODULE_NAME.dotted_string == str(rfc4108.id_on_hardwareModuleName)
    # A UUID OID: the arc below 2.25 is a 128-bit integer.
    assert int(oids.FLEETTRUST_ARC.dotted_string.split(".")[2]) < 2**128


@pytest.mark.parametrize(
    "dotted",
    [
        "1.2.840.10045.4.3.2",
        "2.5.29.19",
        "2.999.3",
        "0.39",
        "1.3.6.1.5.5.7.8.4",
        "2.25.29070838818879774542183493496137085409.1",
        "2.25.340282366920938463463374607431768211455",
    ],
)
def test_der_oid_matches_pyasn1(dotted: str) -> None:
    assert _der.oid(dotted) == der_encoder.encode(univ.ObjectIdentifier(dotted))


@pytest.mark.parametrize("dotted", ["3.1", "1.40", "1", "1.-2.3"])
def test_der_oid_rejects_invalid(dotted: str) -> None:
    with pytest.raises(ValueError, match="invalid OID"):
        _der.oid(dotted)


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 70000])
def test_der_lengths_match_pyasn1(size: int) -> None:
    content = b"\x00" * size
    assert _der.tlv(_der.TAG_OCTET_STRING, content) == der_encoder.encode(univ.OctetString(content))
    text = "é" * (size // 2)
    assert _der.tlv(_der.TAG_UTF8_STRING, text.encode()) == der_encoder.encode(
        char.UTF8String(text)
    )


def test_small_integer() -> None:
    assert _der.small_integer(1) == der_encoder.encode(univ.Integer(1))
    with pytest.raises(ValueError, match=r"0\.\.127"):
        _der.small_integer(128)
