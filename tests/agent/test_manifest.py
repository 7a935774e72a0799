"""Manifest gathering: fake sysfs/procfs trees, override files, and this machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleettrust.agent.manifest import gather_manifest, system_manifest
from fleettrust.errors import ValidationError
from fleettrust.pki.manifest import canonical_json, normalize_manifest


def _nic(root: Path, name: str, address: str, *, physical: bool = True,
         assign_type: str = "0") -> None:
    iface = root / "sys/class/net" / name
    iface.mkdir(parents=True)
    (iface / "address").write_text(address + "\n")
    (iface / "addr_assign_type").write_text(assign_type + "\n")
    if physical:
        (iface / "device").mkdir()


@pytest.fixture
def sysroot(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "proc").mkdir(parents=True)
    (root / "proc/cpuinfo").write_text(
        "processor\t: 0\nmodel name\t: ARMv7 Processor rev 3 (v7l)\n"
        "Hardware\t: BCM2835\nRevision\t: a02082\nSerial\t\t: 00000000c0ffee01\n")
    _nic(root, "lo", "00:00:00:00:00:00", physical=False)
    _nic(root, "eth0", "DC:A6:32:01:02:03")
    _nic(root, "wlan0", "dc:a6:32:01:02:04")
    _nic(root, "wlan1", "3a:11:22:33:44:55", assign_type="1")  # randomised
    _nic(root, "docker0", "02:42:ac:11:00:01", physical=False)
    _nic(root, "usb0", "00:00:00:00:00:00")
    (root / "etc").mkdir()
    (root / "etc/machine-id").write_text("3d1219c7c4c5404aaa1f6d2a48adfda4\n")
    return root


def test_gathers_serial_and_physical_permanent_macs(sysroot: Path) -> None:
    manifest = gather_manifest(sysroot=sysroot)
    assert manifest.cpu_serial == "00000000c0ffee01"
    assert manifest.mac_addresses == ("dc:a6:32:01:02:03", "dc:a6:32:01:02:04")
    assert manifest.other == ()  # machine id only as a fallback


def test_devicetree_serial_then_machine_id_fallbacks(sysroot: Path) -> None:
    (sysroot / "proc/cpuinfo").write_text("processor\t: 0\nSerial\t\t: 0000000000000000\n")
    dt_dir = sysroot / "sys/firmware/devicetree/base"
    dt_dir.mkdir(parents=True)
    (dt_dir / "serial-number").write_bytes(b"1234ABCD5678\x00")
    assert gather_manifest(sysroot=sysroot).cpu_serial == "1234ABCD5678"
    (dt_dir / "serial-number").unlink()
    raw = system_manifest(sysroot)
    assert "cpu_serial" not in raw
    machine_id = raw["other"]["machine_id"]
    assert len(machine_id) == 32
    assert "3d1219c7" not in machine_id  # hashed, not disclosed
    assert machine_id == system_manifest(sysroot)["other"]["machine_id"]  # stable


def test_nothing_found_is_a_precise_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as info:
        gather_manifest(sysroot=tmp_path)
    assert info.value.code == "manifest_empty"
    assert "--manifest-file" in info.value.message


def test_bare_override_replaces(sysroot: Path, tmp_path: Path) -> None:
    override = tmp_path / "m.json"
    override.write_text(json.dumps({"cpu_serial": "SIM-1", "imei": "490154203237518"}))
    manifest = gather_manifest(override_file=override, sysroot=sysroot)
    assert manifest.to_dict() == {"cpu_serial": "SIM-1", "imei": "490154203237518"}


def test_extend_override_merges(sysroot: Path, tmp_path: Path) -> None:
    override = tmp_path / "m.json"
    override.write_text(json.dumps({"mode": "extend", "manifest": {
        "imei": "490154203237518", "lte_module_id": "EG25-000123",
        "mac_addresses": ["dc-a6-32-01-02-03", "02:00:00:00:00:77"],
        "other": {"tpm_ek_serial": "0x1234"}, "cpu_serial": None}}))
    manifest = gather_manifest(override_file=override, sysroot=sysroot)
    assert manifest.cpu_serial is None  # null removes
    assert manifest.imei == "490154203237518"
    assert manifest.lte_module_id == "EG25-000123"
    assert manifest.mac_addresses == ("02:00:00:00:00:77", "dc:a6:32:01:02:03",
                                      "dc:a6:32:01:02:04")
    assert manifest.other == (("tpm_ek_serial", "0x1234"),)


@pytest.mark.parametrize(("content", "code"), [
    ("not json", "manifest_override_invalid"),
    ("[1, 2]", "manifest_override_invalid"),
    ('{"mode": "merge", "manifest": {}}', "manifest_override_invalid"),
    ('{"cpu_serial": "A", "colour": "red"}', "manifest_invalid"),
    ('{"imei": "490154203237519"}', "manifest_invalid"),
])
def test_bad_override_files(sysroot: Path, tmp_path: Path, content: str, code: str) -> None:
    override = tmp_path / "m.json"
    override.write_text(content)
    with pytest.raises(ValidationError) as info:
        gather_manifest(override_file=override, sysroot=sysroot)
    assert info.value.code == code


def test_on_this_machine() -> None:
    """Whatever this machine is, the result is either a valid normalised manifest or the
    precise 'nothing found' error — never an invalid manifest."""
    try:
        manifest = gather_manifest()
    except ValidationError as exc:
        code = exc.code
        assert code == "manifest_empty", exc.message  # noqa: PT017  # either outcome is valid
        return
    assert normalize_manifest(json.loads(canonical_json(manifest))) == manifest
    for mac in manifest.mac_addresses:
        assert mac != "00:00:00:00:00:00"
