"""Device issuance through the service: single, bulk, all-or-nothing, policy, profile, audit.

Real components only (SQLite and PostgreSQL via the ``db_url`` fixture, file key store).
"""

from __future__ import annotations

import datetime as dt
import re
import threading
from collections.abc import Callable
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID
from sqlalchemy import Engine, delete, func, select, text, update
from sqlalchemy.exc import DBAPIError

from fleettrust import pki
from fleettrust.errors import (
    AuthorizationError,
    FleetTrustError,
    PolicyError,
    ValidationError,
)
from fleettrust.services import hierarchy, issuance
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import (
    AuditEvent,
    Batch,
    Certificate,
    Device,
    Finding,
    HardwareIdentifier,
)
from tests.conftest import Hierarchy, device_csr, make_principal, manifest
from tests.services.test_hierarchy import db_bytes, db_snapshot

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
Req = issuance.IssueRequest


def new_batch(ctx: ServiceContext, who: Principal, factory: hierarchy.FactoryCreated,
              size: int, name: str = "B", *, own_ca: bool = False) -> str:
    return hierarchy.create_batch(
        ctx, who, factory.factory.id, name=name, product_model="TH-100",
        hardware_revision="r2", planned_size=size, manufactured_on=dt.date(2026, 11, 20),
        own_ca=own_ca,
    ).batch.id


def count(ctx: ServiceContext, model: Any, *where: Any) -> int:
    with ctx.transaction() as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)


def issued_count(ctx: ServiceContext, batch_id: str) -> int:
    with ctx.transaction() as s:
        b = s.get(Batch, batch_id)
        assert b is not None
        return b.issued_count


def issuance_rows(ctx: ServiceContext) -> tuple[int, int, int, int, int]:
    return (
        count(ctx, Device),
        count(ctx, Certificate, Certificate.kind == "device"),
        count(ctx, AuditEvent, AuditEvent.action == "device.manufactured"),
        count(ctx, HardwareIdentifier),
        count(ctx, Finding),
    )


def tampered_csr() -> str:
    csr_pem, _ = device_csr()
    der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    bad = x509.load_der_x509_csr(der.replace(b"device", b"devicf", 1))
    return bad.public_bytes(serialization.Encoding.PEM).decode()


def rsa1024_csr() -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 (weak on purpose)
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "weak")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def code(exc: pytest.ExceptionInfo[FleetTrustError]) -> str:
    return exc.value.code


# --- single and bulk -------------------------------------------------------------------------


def test_single_and_bulk_issuance(ctx: ServiceContext, fleet: Hierarchy,
                                  factory: hierarchy.FactoryCreated,
                                  factory_principal: Principal) -> None:
    batch_id = new_batch(ctx, factory_principal, factory, 400)
    single = issuance.issue_devices(ctx, factory_principal, batch_id,
                                    [Req(csr=device_csr()[0], manifest=manifest(),
                                         device_id="unit-000001", station="line-1")])
    assert [d.device_id for d in single.devices] == ["unit-000001"]
    t0 = dt.datetime.now(dt.UTC)

    items = [Req(csr=device_csr()[0], manifest=manifest(), station="line-2") for _ in range(300)]
    bulk = issuance.issue_devices(ctx, factory_principal, batch_id, items)
    t1 = dt.datetime.now(dt.UTC)
    assert len(bulk.devices) == 300
    serials = {d.serial_hex for d in bulk.devices} | {single.devices[0].serial_hex}
    assert len(serials) == 301
    ids = [d.device_id for d in bulk.devices]
    assert len(set(ids)) == 300
    assert all(re.fullmatch(r"d-[0-9a-z]{21}", i) for i in ids)
    assert issued_count(ctx, batch_id) == 301
    assert issuance_rows(ctx) == (301, 301, 301, 301 * 3, 0)
    with ctx.transaction() as s:
        stored = set(s.scalars(select(Certificate.serial_hex).where(
            Certificate.kind == "device")))
        assert stored == serials
        # Bulk-written timestamps compare correctly with ORM-bound parameters (time windows
        # such as "everything factory F issued between t1 and t2" rely on it).
        in_window = s.scalars(select(Certificate.device_id).where(
            Certificate.kind == "device", Certificate.created_at >= t0,
            Certificate.created_at <= t1)).all()
        assert set(in_window) == set(ids)
        dev = s.get(Device, ids[0])
        assert dev is not None
        assert dev.created_at.tzinfo is not None
        assert abs(dev.created_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
        if ctx.engine.dialect.name == "sqlite":  # the same text format as ORM-written rows
            raw = s.execute(text("SELECT created_at FROM devices LIMIT 1")).scalar()
            orm = s.execute(text("SELECT created_at FROM batches LIMIT 1")).scalar()
            pattern = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}"
            assert re.fullmatch(pattern, str(orm))
            assert re.fullmatch(pattern, str(raw))


def test_bulk_is_all_or_nothing_and_reports_every_bad_line(
    ctx: ServiceContext, fleet: Hierarchy, factory: hierarchy.FactoryCreated,
    factory_principal: Principal,
) -> None:
    batch_id = new_batch(ctx, factory_principal, factory, 50)
    items = [Req(csr=device_csr()[0], manifest=manifest()) for _ in range(10)]
    items[2] = Req(csr=tampered_csr(), manifest=manifest())
    items[4] = Req(csr=rsa1024_csr(), manifest=manifest())
    items[6] = Req(csr=device_csr()[0], manifest={"cpu_serial": "X1", "imei": "123456789012345"})
    items[7] = Req(csr=device_csr()[0], manifest=manifest(), device_id="dup-1")
    items[8] = Req(csr=device_csr()[0], manifest=manifest(), device_id="dup-1")
    before = (issuance_rows(ctx), issued_count(ctx, batch_id))
    with pytest.raises(issuance.BulkRejectedError) as exc:
        issuance.issue_devices(ctx, factory_principal, batch_id, items)
    assert exc.value.code == "bulk_rejected"
    assert [(e["line"], e["code"]) for e in exc.value.details["errors"]] == [
        (3, "csr_bad_signature"), (5, "key_not_allowed"), (7, "manifest_invalid"),
        (9, "duplicate_device_id"),
    ]
    assert all(e["message"] for e in exc.value.details["errors"])
    assert (issuance_rows(ctx), issued_count(ctx, batch_id)) == before == ((0, 0, 0, 0, 0), 0)

    # Conflicts with stored data are reported per line too, and still nothing is written.
    key = ec.generate_private_key(ec.SECP256R1())
    first = issuance.issue_devices(ctx, factory_principal, batch_id, [
        Req(csr=device_csr(key)[0], manifest=manifest(), device_id="stored-1")])
    before = (issuance_rows(ctx), issued_count(ctx, batch_id))
    with pytest.raises(issuance.BulkRejectedError) as exc2:
        issuance.issue_devices(ctx, factory_principal, batch_id, [
            Req(csr=device_csr()[0], manifest=manifest()),
            Req(csr=device_csr()[0], manifest=manifest(), device_id="stored-1"),
            Req(csr=device_csr(key)[0], manifest=manifest()),
        ])
    assert [(e["line"], e["code"]) for e in exc2.value.details["errors"]] == [
        (2, "device_exists"), (3, "key_reused")]
    assert (issuance_rows(ctx), issued_count(ctx, batch_id)) == before
    # A single request gets the line's own error (type and code).
    with pytest.raises(PolicyError) as exc3:
        issuance.issue_devices(ctx, factory_principal, batch_id,
                               [Req(csr=device_csr(key)[0], manifest=manifest())])
    assert code(exc3) == "key_reused"
    assert first.devices[0].device_id in exc3.value.message or "stored-1" in exc3.value.message
    with pytest.raises(ValidationError) as exc4:
        issuance.issue_devices(ctx, factory_principal, batch_id,
                               [Req(csr=tampered_csr(), manifest=manifest())])
    assert code(exc4) == "csr_bad_signature"
    assert (issuance_rows(ctx), issued_count(ctx, batch_id)) == before


@SQLITE_ONLY
def test_request_level_refusals(ctx: ServiceContext, fleet: Hierarchy,
                                factory: hierarchy.FactoryCreated, factory_principal: Principal,
                                batch: hierarchy.BatchCreated) -> None:
    bid = batch.batch.id
    cases: list[tuple[Callable[[], object], type[FleetTrustError], str]] = [
        (lambda: issuance.issue_devices(ctx, factory_principal, bid, []),
         ValidationError, "empty_request"),
        (lambda: issuance.issue_devices(ctx, factory_principal, bid, [
            Req(csr=device_csr()[0], manifest=manifest())] * (ctx.settings.max_bulk_items + 1)),
         ValidationError, "too_many_items"),
        (lambda: issuance.issue_devices(ctx, factory_principal, bid, [
            Req(csr="A" * 20000, manifest=manifest())]), ValidationError, "csr_too_large"),
        (lambda: issuance.issue_devices(ctx, factory_principal, bid, [
            Req(csr="not a csr", manifest=manifest())]), ValidationError, "csr_malformed"),
        (lambda: issuance.issue_devices(ctx, factory_principal, bid, [
            Req(csr=device_csr()[0], manifest=manifest(), device_id="bad id!")]),
         ValidationError, "invalid_device_id"),
        (lambda: issuance.issue_devices(ctx, make_principal(ctx, "auditor", "a"), bid, [
            Req(csr=device_csr()[0], manifest=manifest())]),
         AuthorizationError, "role_not_allowed"),
        (lambda: issuance.issue_devices(ctx, factory_principal, "bat_nope", [
            Req(csr=device_csr()[0], manifest=manifest())]), FleetTrustError, "batch_not_found"),
    ]
    for call, exc_type, expected in cases:
        with pytest.raises(exc_type) as exc:
            call()
        assert code(exc) == expected
    assert issuance_rows(ctx) == (0, 0, 0, 0, 0)


def test_batch_size_enforced_including_exact_fill(ctx: ServiceContext, fleet: Hierarchy,
                                                  factory: hierarchy.FactoryCreated,
                                                  factory_principal: Principal) -> None:
    batch_id = new_batch(ctx, factory_principal, factory, 5)

    def issue(n: int) -> issuance.IssueResult:
        return issuance.issue_devices(ctx, factory_principal, batch_id, [
            Req(csr=device_csr()[0], manifest=manifest()) for _ in range(n)])

    issue(3)
    with pytest.raises(PolicyError) as exc:
        issue(3)
    assert code(exc) == "batch_full"
    assert issued_count(ctx, batch_id) == 3
    issue(2)  # exactly fills the batch
    assert issued_count(ctx, batch_id) == 5
    with pytest.raises(PolicyError) as exc2:
        issue(1)
    assert code(exc2) == "batch_full"
    assert issuance_rows(ctx)[:3] == (5, 5, 5)


# --- hardware identifiers ------------------------------------------------------------------------


def test_hardware_id_already_registered_raises_finding(ctx: ServiceContext, fleet: Hierarchy,
                                                       factory: hierarchy.FactoryCreated,
                                                       factory_principal: Principal,
                                                       batch: hierarchy.BatchCreated) -> None:
    bid = batch.batch.id
    first = issuance.issue_devices(ctx, factory_principal, bid, [
        Req(csr=device_csr()[0], manifest={"cpu_serial": "CPU-CLONE-1", "imei": "490154203237518"},
            device_id="orig-1")])
    assert first.devices[0].findings == []
    # Same CPU serial on another device: issued, but not silently.
    clone_manifest = {"cpu_serial": "CPU-CLONE-1", "mac_addresses": ["DC-A6-32-01-02-03"],
                      "other": {"tpm_ek_serial": "0x77"}}
    res = issuance.issue_devices(ctx, factory_principal, bid, [
        Req(csr=device_csr()[0], manifest=clone_manifest, device_id="clone-1"),
        # two new devices sharing one MAC inside the same request
        Req(csr=device_csr()[0], manifest={"mac_addresses": ["02:00:00:aa:bb:cc"]},
            device_id="twin-a"),
        Req(csr=device_csr()[0], manifest={"mac_addresses": ["02:00:00:AA:BB:CC"]},
            device_id="twin-b"),
    ])
    by_id = {d.device_id: d for d in res.devices}
    assert len(by_id["clone-1"].findings) == 1
    assert len(by_id["twin-a"].findings) == 1
    assert len(by_id["twin-b"].findings) == 1
    with ctx.transaction() as s:
        finding = s.get(Finding, by_id["clone-1"].findings[0])
        assert finding is not None
        assert (finding.kind, finding.device_id, finding.status) == (
            "hardware_id_conflict", "clone-1", "open")
        assert finding.evidence["identifier_kind"] == "cpu_serial"
        assert finding.evidence["identifier_value"] == "CPU-CLONE-1"
        assert finding.evidence["claimed_by"] == ["orig-1", "clone-1"]
        twin = s.get(Finding, by_id["twin-b"].findings[0])
        assert twin is not None
        assert twin.evidence["identifier_value"] == "02:00:00:aa:bb:cc"
        assert sorted(twin.evidence["claimed_by"]) == ["twin-a", "twin-b"]
        # The original device has no finding of its own (it was first), and every identifier
        # of the new device is stored, normalised.
        assert s.scalars(select(Finding).where(Finding.device_id == "orig-1")).all() == []
        idents = {(k, v) for k, v in s.execute(select(
            HardwareIdentifier.kind, HardwareIdentifier.value).where(
                HardwareIdentifier.device_id == "clone-1"))}
        assert idents == {("cpu_serial", "CPU-CLONE-1"), ("mac", "dc:a6:32:01:02:03"),
                          ("other:tpm_ek_serial", "0x77")}
        dev = s.get(Device, "clone-1")
        assert dev is not None
        assert dev.manifest == pki.normalize_manifest(clone_manifest).to_dict()
        event = s.scalars(select(AuditEvent).where(AuditEvent.target_id == "clone-1")).one()
        assert event.details["findings"] == by_id["clone-1"].findings


# --- certificate profile -------------------------------------------------------------------------


@SQLITE_ONLY
def test_device_certificate_profile(ctx: ServiceContext, fleet: Hierarchy,
                                    factory: hierarchy.FactoryCreated,
                                    factory_principal: Principal,
                                    batch: hierarchy.BatchCreated) -> None:
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(20)]
    manifests = [manifest() for _ in keys]
    res = issuance.issue_devices(ctx, factory_principal, batch.batch.id, [
        Req(csr=device_csr(k)[0], manifest=m) for k, m in zip(keys, manifests, strict=True)])
    base = ctx.settings.base_url
    ca_id = factory.ca.id
    issuer = x509.load_pem_x509_certificate(res.chain_pem[0].encode())
    for dev, key, m in zip(res.devices, keys, manifests, strict=True):
        cert = x509.load_pem_x509_certificate(dev.certificate_pem.encode())
        ext = cert.extensions
        assert cert.public_key() == key.public_key()
        cert.verify_directly_issued_by(issuer)
        assert 64 <= cert.serial_number.bit_length() <= 159
        assert format(cert.serial_number, "x") == dev.serial_hex
        assert cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == \
            dev.device_id
        bc = ext.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical
        assert not bc.value.ca
        ku = ext.get_extension_for_class(x509.KeyUsage)
        assert ku.critical
        assert ku.value.digital_signature
        assert not ku.value.key_cert_sign
        assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
            ExtendedKeyUsageOID.CLIENT_AUTH]
        assert ext.get_extension_for_class(x509.SubjectKeyIdentifier).value == \
            x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        assert ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == \
            issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
        # SAN: exactly one RFC 4108 hardwareModuleName {fleettrust hwType, device id}
        san = list(ext.get_extension_for_class(x509.SubjectAlternativeName).value)
        assert len(san) == 1
        assert isinstance(san[0], x509.OtherName)
        assert san[0].type_id == pki.HARDWARE_MODULE_NAME
        assert san[0].value == pki.profiles.hardware_module_name(dev.device_id).value
        assert dev.device_id.encode() in san[0].value
        # CRL distribution point: the issuer's shard for this serial
        dps = ext.get_extension_for_class(x509.CRLDistributionPoints).value
        uris = [n.value for dp in dps for n in (dp.full_name or [])]
        shard = cert.serial_number % ctx.settings.crl_shards
        assert uris == [f"{base}/crl/{ca_id}/{shard}.crl"]
        aia = {d.access_method: d.access_location.value
               for d in ext.get_extension_for_class(x509.AuthorityInformationAccess).value}
        assert aia[AuthorityInformationAccessOID.OCSP] == f"{base}/ocsp"
        assert aia[AuthorityInformationAccessOID.CA_ISSUERS] == f"{base}/ca/{ca_id}.der"
        # device binding: batch id + SHA-256 of the canonical manifest
        binding = pki.device_binding_from_certificate(cert)
        assert binding is not None
        assert binding.batch_id == batch.batch.id
        assert binding.manifest_sha256 == pki.manifest_hash(pki.normalize_manifest(m))
        assert not ext.get_extension_for_oid(pki.DEVICE_BINDING).critical
        assert cert.not_valid_after_utc <= issuer.not_valid_after_utc
    assert len({d.serial_hex for d in res.devices}) == 20
    shards = {int(d.serial_hex, 16) % ctx.settings.crl_shards for d in res.devices}
    assert len(shards) > 1
    with ctx.transaction() as s:
        row = s.get(Certificate, res.devices[0].serial_hex)
        assert row is not None
        cert = x509.load_pem_x509_certificate(res.devices[0].certificate_pem.encode())
        assert row.der == cert.public_bytes(serialization.Encoding.DER)
        assert row.public_key_sha256 == pki.public_key_fingerprint(keys[0].public_key())
        assert (row.kind, row.ca_id, row.device_id, row.status) == (
            "device", ca_id, res.devices[0].device_id, "good")
        assert row.not_after == cert.not_valid_after_utc
        dev = s.get(Device, res.devices[0].device_id)
        assert dev is not None
        assert (dev.key_origin, dev.weak_identity, dev.status) == ("device", False, "active")
        assert dev.manifest_sha256 == pki.manifest_hash(
            pki.normalize_manifest(manifests[0])).hex()


# --- server-side key generation ------------------------------------------------------------------


@SQLITE_ONLY
def test_server_side_key_generation(ctx: ServiceContext, fleet: Hierarchy,
                                    factory: hierarchy.FactoryCreated,
                                    factory_principal: Principal,
                                    batch: hierarchy.BatchCreated) -> None:
    bid, pw = batch.batch.id, "correct horse battery"
    gen8 = issuance.issue_with_server_key(ctx, factory_principal, bid, manifest=manifest(),
                                          passphrase=pw, key_format="pkcs8")
    assert gen8.key_bytes.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    key = serialization.load_pem_private_key(gen8.key_bytes, password=pw.encode())
    cert = x509.load_pem_x509_certificate(gen8.issued.devices[0].certificate_pem.encode())
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == cert.public_key()
    with pytest.raises(ValueError, match=r"(?i)password|decrypt"):
        serialization.load_pem_private_key(gen8.key_bytes, password=b"wrong passphrase")

    gen12 = issuance.issue_with_server_key(ctx, factory_principal, bid, manifest=manifest(),
                                           passphrase=pw, key_format="pkcs12",
                                           device_id="srv-key-12")
    loaded = pkcs12.load_pkcs12(gen12.key_bytes, pw.encode())
    assert loaded.key is not None
    assert loaded.cert is not None
    assert loaded.cert.certificate.public_key() == loaded.key.public_key()
    assert loaded.cert.friendly_name == b"srv-key-12"
    assert [c.certificate.public_bytes(serialization.Encoding.PEM).decode()
            for c in loaded.additional_certs] == gen12.issued.chain_pem
    with pytest.raises(ValueError, match=r"(?i)password|decrypt|mac"):
        pkcs12.load_pkcs12(gen12.key_bytes, b"wrong passphrase")

    with ctx.transaction() as s:
        for dev_id in (gen8.issued.devices[0].device_id, "srv-key-12"):
            dev = s.get(Device, dev_id)
            assert dev is not None
            assert (dev.key_origin, dev.weak_identity) == ("server", True)
    # The server keeps no copy of the keys it generated.
    blob = db_bytes(ctx.engine)
    for k in (key, loaded.key):
        assert isinstance(k, ec.EllipticCurvePrivateKey)
        assert k.private_numbers().private_value.to_bytes(32, "big") not in blob

    before = db_snapshot(ctx.engine)
    with pytest.raises(ValidationError) as exc:
        issuance.issue_with_server_key(ctx, factory_principal, bid, manifest=manifest(),
                                       passphrase="short")
    assert code(exc) == "weak_passphrase"
    with pytest.raises(ValidationError) as exc2:
        issuance.issue_with_server_key(ctx, factory_principal, bid, manifest=manifest(),
                                       passphrase=pw, key_format="jks")
    assert code(exc2) == "bad_key_format"
    assert db_snapshot(ctx.engine) == before


# --- audit ---------------------------------------------------------------------------------------


def test_audit_events_per_device_and_append_only(ctx: ServiceContext, fleet: Hierarchy,
                                                 factory: hierarchy.FactoryCreated,
                                                 factory_principal: Principal,
                                                 batch: hierarchy.BatchCreated) -> None:
    res = issuance.issue_devices(ctx, factory_principal, batch.batch.id, [
        Req(csr=device_csr()[0], manifest=manifest(), station="line-7") for _ in range(5)])
    with ctx.transaction() as s:
        events = s.scalars(select(AuditEvent).where(
            AuditEvent.action == "device.manufactured").order_by(AuditEvent.id)).all()
        assert [e.target_id for e in events] == [d.device_id for d in res.devices]
        for e, d in zip(events, res.devices, strict=True):
            assert (e.actor, e.actor_role, e.target_type, e.remote_addr) == (
                "factory:station-1", "factory", "device", "127.0.0.1")
            assert e.details["serial"] == d.serial_hex
            assert e.details["batch_id"] == batch.batch.id
            assert e.details["factory_id"] == factory.factory.id
            assert e.details["ca_id"] == factory.ca.id
            assert e.details["station"] == "line-7"
            assert e.details["key_origin"] == "device"
            assert re.fullmatch(r"[0-9a-f]{64}", e.details["manifest_sha256"])
            assert e.details["findings"] == []
            assert abs(e.occurred_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    _assert_append_only(ctx.engine)


def _assert_append_only(engine: Engine) -> None:
    with engine.connect() as conn:
        n = conn.execute(select(func.count()).select_from(AuditEvent)).scalar()
    for stmt in (update(AuditEvent).values(actor="mallory"), delete(AuditEvent),
                 delete(AuditEvent).where(AuditEvent.action == "device.manufactured")):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
            conn.execute(stmt)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(AuditEvent)).scalar() == n
        assert conn.execute(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.actor == "mallory")).scalar() == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_racing_requests_for_one_device_id(ctx: ServiceContext, fleet: Hierarchy,
                                           factory: hierarchy.FactoryCreated,
                                           factory_principal: Principal) -> None:
    """Two requests claim the same device id at once: exactly one wins, the other is refused
    precisely (whichever check catches it) and leaves nothing behind."""
    batch_id = new_batch(ctx, factory_principal, factory, 400, "race")
    barrier = threading.Barrier(4)
    outcomes: list[object] = []

    def request(i: int) -> None:
        items = [Req(csr=device_csr()[0], manifest=manifest()) for _ in range(40)]
        items.append(Req(csr=device_csr()[0], manifest=manifest(), device_id="contested-1"))
        barrier.wait()
        try:
            outcomes.append(issuance.issue_devices(ctx, factory_principal, batch_id,
                                                   items[::-1] if i % 2 else items))
        except FleetTrustError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    won = [o for o in outcomes if isinstance(o, issuance.IssueResult)]
    lost = [o for o in outcomes if isinstance(o, FleetTrustError)]
    assert len(won) == 1
    assert len(lost) == 3
    for exc in lost:
        codes = {e["code"] for e in exc.details.get("errors", [])} or {exc.code}
        assert codes <= {"device_exists", "concurrent_conflict"}, codes
    assert issued_count(ctx, batch_id) == 41
    assert issuance_rows(ctx)[:3] == (41, 41, 41)
