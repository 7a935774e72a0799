"""state.json: round trip, generation, precise validation errors, locking, cleanup."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust.agent.state import StateError, StateStore
from tests.agent.conftest import Enrolled, enroll_device
from tests.agent.pki_helpers import TestPKI


def _edit(state_dir: Path, **changes: object) -> None:
    path = state_dir / "state.json"
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


def test_enrolled_state_loads_and_files_are_private(enrolled: Enrolled) -> None:
    identity = StateStore(enrolled.state_dir).load()
    state = identity.state
    assert state.phase == "enrolled"
    assert state.device_id == enrolled.state.device_id
    assert identity.certificate == enrolled.certificate
    assert state.generation == 2  # enroll (1) + install (2)
    assert (enrolled.state_dir.stat().st_mode & 0o777) == 0o700
    assert identity.key_path is not None
    assert identity.key_path.stat().st_mode & 0o777 == 0o600
    assert (enrolled.state_dir / "state.json").stat().st_mode & 0o777 == 0o600
    # the certificate file carries leaf + chain, as TLS presents it
    assert identity.certificate_path.read_text().count("BEGIN CERTIFICATE") == 2


def test_generation_increments_on_every_write_and_stale_writes_are_refused(
        enrolled: Enrolled) -> None:
    store = StateStore(enrolled.state_dir)
    first = store.read()
    second = store.save(first.evolve(boot_counter=first.boot_counter + 1))
    assert second.generation == first.generation + 1
    assert store.read() == second
    with pytest.raises(StateError) as info:
        store.save(first.evolve(boot_counter=99))  # based on an old generation
    assert info.value.code == "state_conflict"


def test_missing_state(tmp_path: Path) -> None:
    with pytest.raises(StateError) as info:
        StateStore(tmp_path).load()
    assert info.value.code == "state_missing"


@pytest.mark.parametrize(("changes", "field"), [
    ({"generation": -1}, "generation"),
    ({"generation": "7"}, "generation"),
    ({"phase": "running"}, "phase"),
    ({"certificate_file": "../../etc/passwd"}, "certificate_file"),
    ({"certificate_file": "key-0123456789abcdef.pem"}, "certificate_file"),
    ({"surprise": 1}, "surprise"),
    ({"device_id": None}, "device_id"),
    ({"updated_at": "yesterday"}, "updated_at"),
    ({"key": {"kind": "tpm"}}, "key.kind"),
    ({"version": 2}, "version"),
])
def test_schema_errors_name_the_field(enrolled: Enrolled, changes: dict[str, object],
                                      field: str) -> None:
    _edit(enrolled.state_dir, **changes)
    with pytest.raises(StateError) as info:
        StateStore(enrolled.state_dir).load()
    assert info.value.code == "state_schema_invalid"
    assert info.value.details["field"] == field
    assert field in info.value.message


def test_missing_identity_file(enrolled: Enrolled) -> None:
    state = StateStore(enrolled.state_dir).read()
    assert state.certificate_file is not None
    os.unlink(enrolled.state_dir / state.certificate_file)
    with pytest.raises(StateError) as info:
        StateStore(enrolled.state_dir).load()
    assert info.value.code == "state_file_missing"


def test_certificate_for_another_key_is_detected(enrolled: Enrolled, test_pki: TestPKI) -> None:
    state = StateStore(enrolled.state_dir).read()
    assert state.key.file is not None
    other = ec.generate_private_key(ec.SECP256R1())
    (enrolled.state_dir / state.key.file).write_bytes(other.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    with pytest.raises(StateError) as info:
        StateStore(enrolled.state_dir).load()
    assert info.value.code == "state_key_mismatch"


def test_foreign_root_is_detected(enrolled: Enrolled, tmp_path: Path) -> None:
    state = StateStore(enrolled.state_dir).read()
    assert state.root_file is not None
    TestPKI(name="Foreign").write_root(enrolled.state_dir / state.root_file)
    with pytest.raises(StateError) as info:
        StateStore(enrolled.state_dir).load()
    assert info.value.code == "state_root_mismatch"


def test_chain_not_reaching_the_pinned_root_is_detected(enrolled: Enrolled) -> None:
    store = StateStore(enrolled.state_dir)
    state = store.read()
    foreign = TestPKI(name="Foreign")
    foreign.write_root(enrolled.state_dir / str(state.root_file))
    _edit(enrolled.state_dir, root_fingerprint=__import__(
        "fleettrust.pki", fromlist=["x"]).fingerprint_sha256(foreign.root))
    with pytest.raises(StateError) as info:
        store.load()
    assert info.value.code == "state_chain_invalid"


def test_lock_is_exclusive(enrolled: Enrolled) -> None:
    first, second = StateStore(enrolled.state_dir), StateStore(enrolled.state_dir)
    with first.locked():
        with pytest.raises(StateError) as info:
            second.acquire_lock()
        assert info.value.code == "state_locked"
    with second.locked():
        pass


def test_cleanup_removes_only_unreferenced_files(enrolled: Enrolled) -> None:
    store = StateStore(enrolled.state_dir)
    state = store.read()
    (enrolled.state_dir / "cert-00000000deadbeef.pem").write_text("orphan")
    (enrolled.state_dir / ".tmp-abc").write_text("partial")
    (enrolled.state_dir / "notes.txt").write_text("not ours")
    removed = store.cleanup(state)
    assert sorted(removed) == [".tmp-abc", "cert-00000000deadbeef.pem"]
    assert (enrolled.state_dir / "notes.txt").exists()
    store.load()


def test_enroll_refuses_to_overwrite_an_enrolled_device(enrolled: Enrolled,
                                                        test_pki: TestPKI) -> None:
    from fleettrust.agent.enroll import EnrollmentError, enroll

    with pytest.raises(EnrollmentError) as info:
        enroll(enrolled.state_dir, manifest=enrolled.manifest)
    assert info.value.code == "already_enrolled"
    again = enroll_device(test_pki, enrolled.state_dir.parent / "other")
    assert again.state.device_id != enrolled.state.device_id


def test_install_picks_our_certificate_and_refuses_foreign_ones(tmp_path: Path,
                                                                test_pki: TestPKI) -> None:
    from fleettrust.agent.enroll import EnrollmentError, enroll, install
    from fleettrust.pki.manifest import normalize_manifest

    manifest = normalize_manifest({"cpu_serial": "X1"})
    ours = enroll(tmp_path / "a", manifest=manifest)
    theirs = enroll(tmp_path / "b", manifest=manifest)
    response_b = test_pki.issue_response(theirs.csr_pem, theirs.manifest)
    with pytest.raises(EnrollmentError) as info:
        install(tmp_path / "a", response_b)
    assert info.value.code == "no_matching_device"
    response_a = test_pki.issue_response(ours.csr_pem, ours.manifest)
    combined = dict(response_a, devices=response_b["devices"] + response_a["devices"])
    with pytest.raises(EnrollmentError) as info:
        install(tmp_path / "a", combined, expected_root_fingerprint="00:11")
    assert info.value.code == "root_mismatch"
    state = install(tmp_path / "a", combined)
    assert state.device_id == response_a["devices"][0]["device_id"]
    assert install(tmp_path / "a", combined) == state  # idempotent
