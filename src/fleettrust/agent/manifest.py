"""Gathering the device's hardware manifest from the running Linux system.

What this module does — :func:`gather_manifest` reads, under a configurable ``sysroot`` (``/``
on a device, a fake tree in tests):

* ``cpu_serial``: the ``Serial`` line of ``/proc/cpuinfo`` (Raspberry Pi and other ARM boards),
  else ``/sys/firmware/devicetree/base/serial-number``; an all-zero serial counts as absent;
* ``mac_addresses``: ``/sys/class/net/<if>/address`` of *physical* interfaces only — the
  interface has a ``device`` link (virtual ones: lo, bridges, veth, tun, ifb… have none), its
  address is permanent (``addr_assign_type`` not 1 = random), and the address is a valid
  unicast, non-zero EUI-48; at most 16, sorted;
* ``other.machine_id``: when no CPU/board serial exists, an HMAC-SHA256 of ``/etc/machine-id``
  (keyed by the machine id, message ``fleettrust-machine-id-v1``, first 32 hex digits) so the raw
  id is not disclosed. It is put under ``other`` and not in ``cpu_serial`` on purpose: it is an
  OS installation identifier (changes on re-imaging), not a hardware serial, and the registry
  indexes ``cpu_serial`` as hardware for clone detection.
* IMEI, WLAN and LTE module ids are not probed (no portable source): an override file adds them.

Override file (``--manifest-file``), JSON, one of:

* a bare manifest object (``{"cpu_serial": …, "mac_addresses": […]}``): *replaces* the
  gathered manifest entirely (tests, simulations, factory stations that know better);
* ``{"mode": "replace" | "extend", "manifest": {…}}``: ``extend`` merges into the gathered
  manifest — scalar keys are replaced, ``mac_addresses`` are added (union), ``other`` entries
  merged, and a ``null`` value removes that key.

The result always goes through :func:`fleettrust.pki.normalize_manifest`; errors are
:class:`~fleettrust.errors.ValidationError` naming the file and field. This module does not
sign anything and does no network I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from fleettrust.errors import ValidationError
from fleettrust.pki.manifest import (
    KNOWN_KEYS,
    MAX_MAC_ADDRESSES,
    Manifest,
    normalize_mac,
    normalize_manifest,
)

__all__ = ["gather_manifest", "load_override", "merge_manifest", "system_manifest"]

_ZERO_SERIALS: Final = frozenset({"", "0" * 8, "0" * 16})
_NET_ADDR_RANDOM: Final = "1"
_OVERRIDE_MAX_BYTES: Final = 65536


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def _cpu_serial(sysroot: Path) -> str | None:
    cpuinfo = _read_text(sysroot / "proc/cpuinfo")
    if cpuinfo is not None:
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip().lower() == "serial":
                serial = value.strip()
                if serial.strip("0") and serial not in _ZERO_SERIALS:
                    return serial[:128]
    dt_serial = _read_text(sysroot / "sys/firmware/devicetree/base/serial-number")
    if dt_serial is not None:
        serial = dt_serial.replace("\x00", "").strip()
        if serial.strip("0"):
            return serial[:128]
    return None


def _machine_id(sysroot: Path) -> str | None:
    raw = _read_text(sysroot / "etc/machine-id")
    if raw is None or not raw.strip():
        return None
    mid = raw.strip().encode("ascii", errors="replace")
    return hmac.new(mid, b"fleettrust-machine-id-v1", hashlib.sha256).hexdigest()[:32]


def _physical_macs(sysroot: Path) -> list[str]:
    net = sysroot / "sys/class/net"
    try:
        interfaces = sorted(p for p in net.iterdir() if p.name != "lo")
    except OSError:
        return []
    macs: set[str] = set()
    for iface in interfaces:
        if not (iface / "device").exists():
            continue  # virtual interface (bridge, veth, tun, ifb, docker0, ...)
        assign_type = _read_text(iface / "addr_assign_type")
        if assign_type is not None and assign_type.strip() == _NET_ADDR_RANDOM:
            continue  # randomised address: not an identifier
        address = _read_text(iface / "address")
        if address is None:
            continue
        try:
            macs.add(normalize_mac(address.strip()))
        except ValidationError:
            continue  # all-zero, multicast, or not EUI-48 (e.g. InfiniBand)
    return sorted(macs)[:MAX_MAC_ADDRESSES]


def system_manifest(sysroot: Path = Path("/")) -> dict[str, Any]:
    """The raw (not yet normalised) manifest this system reports; may be empty."""
    raw: dict[str, Any] = {}
    serial = _cpu_serial(sysroot)
    if serial is not None:
        raw["cpu_serial"] = serial
    macs = _physical_macs(sysroot)
    if macs:
        raw["mac_addresses"] = macs
    if serial is None:
        machine_id = _machine_id(sysroot)
        if machine_id is not None:
            raw["other"] = {"machine_id": machine_id}
    return raw


def load_override(path: Path) -> tuple[str, dict[str, Any]]:
    """Read an override file: ``(mode, manifest object)`` with mode ``replace`` or ``extend``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValidationError(
            f"cannot read manifest override file {path}: {exc.strerror}",
            code="manifest_override_unreadable",
        ) from exc
    if len(data) > _OVERRIDE_MAX_BYTES:
        raise ValidationError(
            f"manifest override file {path} is {len(data)} bytes (at most {_OVERRIDE_MAX_BYTES})",
            code="manifest_override_invalid",
        )
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise ValidationError(
            f"manifest override file {path} is not valid JSON: {exc}",
            code="manifest_override_invalid",
        ) from exc
    if not isinstance(parsed, dict):
        raise ValidationError(
            f"manifest override file {path} must hold a JSON object",
            code="manifest_override_invalid",
        )
    if "manifest" in parsed or "mode" in parsed:
        extra = set(parsed) - {"manifest", "mode"}
        mode = parsed.get("mode", "replace")
        inner = parsed.get("manifest")
        if extra or mode not in ("replace", "extend") or not isinstance(inner, dict):
            raise ValidationError(
                f"manifest override file {path}: expected {{\"mode\": \"replace\"|\"extend\", "
                f"\"manifest\": {{...}}}} (unexpected keys: {sorted(extra)}, mode: {mode!r})",
                code="manifest_override_invalid",
            )
        return str(mode), inner
    return "replace", parsed


def merge_manifest(base: Mapping[str, Any], extension: Mapping[str, Any]) -> dict[str, Any]:
    """``extend`` semantics: scalars replaced, MACs unioned, ``other`` merged, null removes."""
    merged: dict[str, Any] = dict(base)
    for key, value in extension.items():
        if value is None:
            merged.pop(key, None)
        elif key == "mac_addresses" and isinstance(value, list):
            current = list(merged.get("mac_addresses") or [])
            normalized = set()
            for mac in current:
                try:
                    normalized.add(normalize_mac(mac))
                except ValidationError:
                    normalized.add(str(mac))
            for mac in value:
                try:
                    norm = normalize_mac(mac)
                except ValidationError:
                    current.append(mac)  # let normalize_manifest report it precisely
                    continue
                if norm not in normalized:
                    normalized.add(norm)
                    current.append(mac)
            merged["mac_addresses"] = current
        elif key == "other" and isinstance(value, dict):
            other = dict(merged.get("other") or {})
            for name, item in value.items():
                if item is None:
                    other.pop(name, None)
                else:
                    other[name] = item
            if other:
                merged["other"] = other
            else:
                merged.pop("other", None)
        else:
            merged[key] = value
    return merged


def gather_manifest(
    *, override_file: Path | None = None, sysroot: Path = Path("/")
) -> Manifest:
    """Gather, apply the override (if any) and normalise. ValidationError if nothing usable."""
    raw: dict[str, Any]
    if override_file is not None:
        mode, override = load_override(override_file)
        unknown = set(override) - KNOWN_KEYS
        if unknown:
            raise ValidationError(
                f"manifest override file {override_file}: unknown key(s) {sorted(unknown)} "
                f"(allowed: {', '.join(sorted(KNOWN_KEYS))})",
                code="manifest_invalid",
            )
        raw = override if mode == "replace" else merge_manifest(system_manifest(sysroot), override)
    else:
        raw = system_manifest(sysroot)
    if not raw:
        raise ValidationError(
            "no hardware identifier found on this system (no CPU/board serial in /proc/cpuinfo "
            "or the device tree, no physical NIC with a permanent MAC address, no "
            "/etc/machine-id): pass --manifest-file",
            code="manifest_empty",
        )
    source = f" (from {override_file})" if override_file is not None else ""
    try:
        return normalize_manifest(raw)
    except ValidationError as exc:
        raise ValidationError(
            f"{exc.message}{source}", code=exc.code, **exc.details
        ) from None
