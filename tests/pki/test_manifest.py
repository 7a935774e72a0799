"""Hardware manifests: normalisation, Luhn, canonical JSON, identifiers."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from fleettrust.errors import ValidationError
from fleettrust.pki import (
    Manifest,
    canonical_json,
    identifiers,
    load_manifest_json,
    manifest_hash,
    normalize_manifest,
)
from fleettrust.pki.manifest import luhn_valid, normalize_mac

from .conftest import SAMPLE_MANIFEST

EXPECTED_CANONICAL = (
    b'{"cpu_serial":"0000000012345678","imei":"490154203237518","lte_module_id":"EG25-000123",'
    b'"mac_addresses":["dc:a6:32:01:02:03","dc:a6:32:01:02:04"],'
    b'"other":{"tpm_ek_serial":"0x1234"},"wlan_module_id":"WLAN-7788"}'
)


def _error(raw: Any) -> ValidationError:
    with pytest.raises(ValidationError) as exc:
        normalize_manifest(raw)
    assert exc.value.code == "manifest_invalid"
    return exc.value


def test_normalize_sample() -> None:
    m = normalize_manifest(SAMPLE_MANIFEST)
    assert m == Manifest(
        cpu_serial="0000000012345678",
        mac_addresses=("dc:a6:32:01:02:03", "dc:a6:32:01:02:04"),
        imei="490154203237518",
        wlan_module_id="WLAN-7788",
        lte_module_id="EG25-000123",
        other=(("tpm_ek_serial", "0x1234"),),
    )


def test_canonical_json_exact_bytes_and_hash() -> None:
    m = normalize_manifest(SAMPLE_MANIFEST)
    assert canonical_json(m) == EXPECTED_CANONICAL
    assert manifest_hash(m) == hashlib.sha256(EXPECTED_CANONICAL).digest()
    assert len(manifest_hash(m)) == 32


def test_canonical_json_is_stable_under_reordering_and_spelling() -> None:
    reordered = {
        "other": {"tpm_ek_serial": "0x1234"},
        "wlan_module_id": "WLAN-7788",
        "mac_addresses": ["dca6.3201.0204", "DCA632010203"],
        "lte_module_id": "EG25-000123",
        "imei": "490154203237518",
        "cpu_serial": "0000000012345678",
    }
    assert canonical_json(normalize_manifest(reordered)) == EXPECTED_CANONICAL
    # null, empty lists and empty maps mean "absent"
    minimal = normalize_manifest(
        {"cpu_serial": "abc", "imei": None, "mac_addresses": [], "other": {}}
    )
    assert canonical_json(minimal) == b'{"cpu_serial":"abc"}'
    # canonical JSON parses back to the same normal form
    assert normalize_manifest(json.loads(EXPECTED_CANONICAL)) == normalize_manifest(SAMPLE_MANIFEST)


def test_canonical_json_escapes_like_rfc8785() -> None:
    m = normalize_manifest({"cpu_serial": 'a"b\\c/d'})
    assert canonical_json(m) == b'{"cpu_serial":"a\\"b\\\\c/d"}'


def test_identifiers() -> None:
    m = normalize_manifest({**SAMPLE_MANIFEST, "other": {"z_part": "9", "a_part": "1"}})
    assert identifiers(m) == [
        ("cpu_serial", "0000000012345678"),
        ("mac", "dc:a6:32:01:02:03"),
        ("mac", "dc:a6:32:01:02:04"),
        ("imei", "490154203237518"),
        ("wlan_module_id", "WLAN-7788"),
        ("lte_module_id", "EG25-000123"),
        ("other:a_part", "1"),
        ("other:z_part", "9"),
    ]


def test_unknown_key_is_named() -> None:
    err = _error({"cpu_serial": "x", "serial_number": "y"})
    assert "'serial_number'" in err.message
    assert err.details["field"] == "serial_number"


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({}, "at least one hardware identifier"),
        ({"mac_addresses": [], "other": {}}, "at least one hardware identifier"),
        ([], "JSON object"),
        ({"cpu_serial": 12345}, "must be a string"),
        ({"cpu_serial": ""}, "printable ASCII"),
        ({"cpu_serial": "x" * 129}, "printable ASCII"),
        ({"cpu_serial": "caf\u00e9"}, "printable ASCII"),
        ({"cpu_serial": "tab\there"}, "printable ASCII"),
        ({"cpu_serial": " padded"}, "whitespace"),
        ({"imei": "49015420323751"}, "15 decimal digits"),
        ({"imei": "490154203237517"}, "Luhn"),
        ({"imei": 490154203237518}, "must be a string"),
        ({"mac_addresses": "dc:a6:32:01:02:03"}, "must be a list"),
        ({"mac_addresses": ["dc:a6:32:01:02"]}, "not a MAC address"),
        ({"mac_addresses": ["dc:a6:32:01:02:0g"]}, "not a MAC address"),
        ({"mac_addresses": ["dc:a6-32:01:02:03"]}, "not a MAC address"),
        ({"mac_addresses": ["00:00:00:00:00:00"]}, "all-zero"),
        ({"mac_addresses": ["ff:ff:ff:ff:ff:ff"]}, "multicast"),
        ({"mac_addresses": ["01:00:5e:00:00:01"]}, "multicast"),
        ({"mac_addresses": ["DC:A6:32:01:02:03", "dca632010203"]}, "listed twice"),
        (
            {"mac_addresses": [f"02:00:00:00:00:{i:02x}" for i in range(17)]},
            "at most 16",
        ),
        ({"other": {"Upper": "x"}}, "must match"),
        ({"other": {"x" * 65: "x"}}, "must match"),
        ({"other": {"ok": 5}}, "must be a string"),
        ({"other": ["x"]}, "must be an object"),
        ({"other": {f"k{i}": "v" for i in range(33)}}, "at most 32"),
    ],
)
def test_invalid_manifests(raw: Any, fragment: str) -> None:
    assert fragment in _error(raw).message


def test_limits_are_inclusive() -> None:
    m = normalize_manifest(
        {
            "cpu_serial": "x" * 128,
            "mac_addresses": [f"02:00:00:00:00:{i:02x}" for i in range(16)],
            "other": {f"k{i:02d}": "v" for i in range(32)},
        }
    )
    assert len(m.mac_addresses) == 16
    assert len(m.other) == 32


@pytest.mark.parametrize(
    "spelling", ["DC:A6:32:01:02:03", "dc-a6-32-01-02-03", "dca6.3201.0203", "DCa632010203"]
)
def test_mac_spellings(spelling: str) -> None:
    assert normalize_mac(spelling) == "dc:a6:32:01:02:03"


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("490154203237518", True),
        ("356938035643809", True),
        ("356938035643808", False),
        ("79927398713", True),
        ("79927398710", False),
        ("", False),
        ("12a4", False),
        ("١٢٣", False),  # non-ASCII digits
    ],
)
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


def test_load_manifest_json() -> None:
    assert load_manifest_json(json.dumps(SAMPLE_MANIFEST)) == normalize_manifest(SAMPLE_MANIFEST)
    with pytest.raises(ValidationError, match="duplicate JSON key 'cpu_serial'"):
        load_manifest_json('{"cpu_serial": "a", "cpu_serial": "b"}')
    with pytest.raises(ValidationError, match="not valid JSON"):
        load_manifest_json("{nope")
    with pytest.raises(ValidationError, match="JSON object"):
        load_manifest_json("[1]")
    with pytest.raises(ValidationError) as exc:
        load_manifest_json(b" " * 20000)
    assert exc.value.code == "manifest_too_large"
