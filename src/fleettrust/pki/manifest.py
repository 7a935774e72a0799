"""Hardware manifests: validation, canonical form, hash and hardware identifiers.

A manifest is the JSON object a factory reports for one device, e.g.::

    {"cpu_serial": "0000000012345678",
     "mac_addresses": ["DC:A6:32:01:02:03", "dc-a6-32-01-02-04"],
     "imei": "490154203237518",
     "wlan_module_id": "WLAN-7788",
     "lte_module_id": "EG25-000123",
     "other": {"tpm_ek_serial": "0x1234"}}

:func:`normalize_manifest` checks it and returns a :class:`Manifest` in normal form:

* only the keys above are allowed (an unknown key is refused and named); ``null`` means absent;
* every value is 1..128 printable ASCII characters (U+0020..U+007E) without leading or trailing
  whitespace; values are otherwise kept verbatim (serials can be case-sensitive);
* ``mac_addresses``: at most 16 unicast, non-zero EUI-48 addresses written ``aa:bb:cc:dd:ee:ff``,
  ``aa-bb-cc-dd-ee-ff``, ``aabb.ccdd.eeff`` or ``aabbccddeeff`` (any case); normalised to
  lower-case colon form, sorted; duplicates are refused;
* ``imei``: exactly 15 decimal digits whose last digit is the Luhn check digit;
* ``other``: at most 32 entries, names matching ``[a-z0-9_.-]{1,64}``;
* at least one identifier must be present.

:func:`canonical_json` serialises the normal form with sorted keys and no whitespace; for the
value space allowed here this is exactly the RFC 8785 (JCS) serialisation, so the bytes (and
:func:`manifest_hash`, their SHA-256) do not depend on key order, MAC spelling or MAC order.
Absent fields, empty MAC lists and empty ``other`` maps are omitted.

:func:`identifiers` lists the (kind, value) pairs the registry indexes to find one hardware
identifier claimed by two devices.

This module does no I/O and does not look anything up; uniqueness is the registry's job.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from fleettrust.errors import ValidationError

VALUE_MAX_CHARS: Final = 128
MAX_MAC_ADDRESSES: Final = 16
MAX_OTHER_ENTRIES: Final = 32
MANIFEST_JSON_MAX_BYTES: Final = 16384

_STRING_FIELDS: Final = ("cpu_serial", "imei", "wlan_module_id", "lte_module_id")
KNOWN_KEYS: Final = frozenset((*_STRING_FIELDS, "mac_addresses", "other"))

_PRINTABLE_RE: Final = re.compile(r"[\x20-\x7e]{1,128}")
_OTHER_NAME_RE: Final = re.compile(r"[a-z0-9_.-]{1,64}")
_IMEI_RE: Final = re.compile(r"[0-9]{15}")
_MAC_FORMS: Final = (
    re.compile(r"[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}"),
    re.compile(r"[0-9A-Fa-f]{2}(?:-[0-9A-Fa-f]{2}){5}"),
    re.compile(r"[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}\.[0-9A-Fa-f]{4}"),
    re.compile(r"[0-9A-Fa-f]{12}"),
)


@dataclass(frozen=True, slots=True)
class Manifest:
    """A validated manifest in normal form (build it with :func:`normalize_manifest`)."""

    cpu_serial: str | None = None
    mac_addresses: tuple[str, ...] = ()
    imei: str | None = None
    wlan_module_id: str | None = None
    lte_module_id: str | None = None
    #: ``other`` entries as (name, value) pairs sorted by name.
    other: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, object]:
        """The JSON object of the normal form (absent and empty fields omitted)."""
        out: dict[str, object] = {}
        for key in _STRING_FIELDS:
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.mac_addresses:
            out["mac_addresses"] = list(self.mac_addresses)
        if self.other:
            out["other"] = dict(self.other)
        return out


def _fail(message: str, field: str) -> ValidationError:
    return ValidationError(message, code="manifest_invalid", field=field)


def _check_value(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise _fail(f"manifest field {field!r} must be a string", field)
    if not _PRINTABLE_RE.fullmatch(value):
        raise _fail(
            f"manifest field {field!r} must be 1..{VALUE_MAX_CHARS} printable ASCII characters",
            field,
        )
    if value != value.strip(" "):
        raise _fail(f"manifest field {field!r} must not start or end with whitespace", field)
    return value


def luhn_valid(digits: str) -> bool:
    """True if the decimal string ``digits`` ends in its correct Luhn check digit."""
    if not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def normalize_mac(value: object, field: str = "mac_addresses") -> str:
    """Normalise one EUI-48 MAC address to ``aa:bb:cc:dd:ee:ff`` (ValidationError if invalid)."""
    text = _check_value(value, field)
    if not any(form.fullmatch(text) for form in _MAC_FORMS):
        raise _fail(f"{field}: {text!r} is not a MAC address (EUI-48)", field)
    hex_digits = re.sub(r"[^0-9a-f]", "", text.lower())
    raw = bytes.fromhex(hex_digits)
    if raw == bytes(6):
        raise _fail(f"{field}: {text!r} is the all-zero MAC address", field)
    if raw[0] & 0x01:
        raise _fail(f"{field}: {text!r} is a multicast/broadcast address, not a device's", field)
    return ":".join(hex_digits[i : i + 2] for i in range(0, 12, 2))


def normalize_manifest(raw: Mapping[str, object]) -> Manifest:
    """Validate ``raw`` (a decoded JSON object) and return its normal form."""
    if not isinstance(raw, Mapping):
        raise _fail("manifest must be a JSON object", "")
    for key in raw:
        if not isinstance(key, str):
            raise _fail(f"manifest keys must be strings, got {key!r}", "")
        if key not in KNOWN_KEYS:
            raise _fail(
                f"unknown manifest key {key!r} (allowed: {', '.join(sorted(KNOWN_KEYS))})", key
            )

    strings: dict[str, str | None] = {}
    for key in _STRING_FIELDS:
        value = raw.get(key)
        strings[key] = None if value is None else _check_value(value, key)
    imei = strings["imei"]
    if imei is not None:
        if not _IMEI_RE.fullmatch(imei):
            raise _fail("manifest field 'imei' must be exactly 15 decimal digits", "imei")
        if not luhn_valid(imei):
            raise _fail("manifest field 'imei' has a wrong Luhn check digit", "imei")

    macs_raw = raw.get("mac_addresses")
    macs: list[str] = []
    if macs_raw is not None:
        if not isinstance(macs_raw, list | tuple):
            raise _fail("manifest field 'mac_addresses' must be a list", "mac_addresses")
        if len(macs_raw) > MAX_MAC_ADDRESSES:
            raise _fail(
                f"manifest field 'mac_addresses' holds {len(macs_raw)} entries "
                f"(at most {MAX_MAC_ADDRESSES})",
                "mac_addresses",
            )
        macs = [normalize_mac(m) for m in macs_raw]
        if len(set(macs)) != len(macs):
            duplicate = next(m for m in macs if macs.count(m) > 1)
            raise _fail(f"MAC address {duplicate} is listed twice", "mac_addresses")
        macs.sort()

    other_raw = raw.get("other")
    other: list[tuple[str, str]] = []
    if other_raw is not None:
        if not isinstance(other_raw, Mapping):
            raise _fail("manifest field 'other' must be an object", "other")
        if len(other_raw) > MAX_OTHER_ENTRIES:
            raise _fail(
                f"manifest field 'other' holds {len(other_raw)} entries "
                f"(at most {MAX_OTHER_ENTRIES})",
                "other",
            )
        for name, value in other_raw.items():
            if not isinstance(name, str) or not _OTHER_NAME_RE.fullmatch(name):
                raise _fail(f"'other' entry name {name!r} must match [a-z0-9_.-]{{1,64}}", "other")
            other.append((name, _check_value(value, f"other.{name}")))
        other.sort()

    manifest = Manifest(
        cpu_serial=strings["cpu_serial"],
        mac_addresses=tuple(macs),
        imei=imei,
        wlan_module_id=strings["wlan_module_id"],
        lte_module_id=strings["lte_module_id"],
        other=tuple(other),
    )
    if not identifiers(manifest):
        raise _fail("manifest must contain at least one hardware identifier", "")
    return manifest


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise _fail(f"duplicate JSON key {key!r} in manifest", key)
        out[key] = value
    return out


def load_manifest_json(data: bytes | str, *, max_bytes: int = MANIFEST_JSON_MAX_BYTES) -> Manifest:
    """Parse manifest JSON text (duplicate keys refused) and normalise it."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) > max_bytes:
        raise ValidationError(
            f"manifest is {len(raw)} bytes (at most {max_bytes})", code="manifest_too_large"
        )
    try:
        parsed = json.loads(raw, object_pairs_hook=_reject_duplicate_keys)
    except ValidationError:
        raise
    except (ValueError, RecursionError) as exc:
        raise _fail(f"manifest is not valid JSON: {exc}", "") from None
    if not isinstance(parsed, dict):
        raise _fail("manifest must be a JSON object", "")
    return normalize_manifest(parsed)


def canonical_json(manifest: Manifest) -> bytes:
    """RFC 8785-style canonical JSON of the normal form (sorted keys, no whitespace, UTF-8)."""
    return json.dumps(
        manifest.to_dict(),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    ).encode("utf-8")


def manifest_hash(manifest: Manifest) -> bytes:
    """SHA-256 of :func:`canonical_json` (32 bytes; goes into the device-binding extension)."""
    return hashlib.sha256(canonical_json(manifest)).digest()


def identifiers(manifest: Manifest) -> list[tuple[str, str]]:
    """(kind, value) pairs: cpu_serial, mac (each), imei, wlan_module_id, lte_module_id,
    ``other:<name>`` (each), in that order."""
    out: list[tuple[str, str]] = []
    if manifest.cpu_serial is not None:
        out.append(("cpu_serial", manifest.cpu_serial))
    out.extend(("mac", mac) for mac in manifest.mac_addresses)
    if manifest.imei is not None:
        out.append(("imei", manifest.imei))
    if manifest.wlan_module_id is not None:
        out.append(("wlan_module_id", manifest.wlan_module_id))
    if manifest.lte_module_id is not None:
        out.append(("lte_module_id", manifest.lte_module_id))
    out.extend((f"other:{name}", value) for name, value in manifest.other)
    return out


__all__ = [
    "KNOWN_KEYS",
    "Manifest",
    "canonical_json",
    "identifiers",
    "load_manifest_json",
    "luhn_valid",
    "manifest_hash",
    "normalize_mac",
    "normalize_manifest",
]
