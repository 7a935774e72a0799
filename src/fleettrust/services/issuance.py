"""Device issuance at manufacturing time: single, bulk and server-side key generation.

One request is one transaction: every item is validated first (CSR signature, key policy,
manifest, device id, duplicates inside the request and against the database); if any item fails
nothing is written and every failing line is reported. Only then is batch capacity reserved with
one conditional UPDATE (so two server processes cannot overfill a batch), certificates signed and
devices, certificates, hardware identifiers, findings and audit events inserted in bulk.

Serial numbers are 159-bit CSPRNG values and ``certificates.serial_hex`` is the primary key, so
the database refuses a reused serial even across processes.

Not here: who the factory is (``auth``), X.509 layout (``pki.profiles``), clone scoring beyond
recording conflicting hardware identifiers (the identity issue builds on the findings).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import insert, select, tuple_, update
from sqlalchemy.orm import Session

from fleettrust import pki
from fleettrust.errors import (
    FleetTrustError,
    NotFoundError,
    PolicyError,
    ValidationError,
)
from fleettrust.ids import new_device_id, new_id
from fleettrust.services.auth import Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import ca_chain, check_factory_scope, crl_url, pem, urls
from fleettrust.storage.models import (
    AuditEvent,
    Batch,
    Certificate,
    CertificateAuthority,
    Device,
    Factory,
    Finding,
    HardwareIdentifier,
)


@dataclass(frozen=True)
class IssueRequest:
    """One device to issue: its CSR (PEM or DER) and hardware manifest."""

    csr: str | bytes
    manifest: dict[str, Any]
    device_id: str | None = None
    station: str | None = None


@dataclass
class _Prepared:
    line: int
    device_id: str
    public_key: Any
    key_fp: str
    manifest: dict[str, Any]
    manifest_sha256: bytes
    identifiers: list[tuple[str, str]]
    station: str | None


@dataclass(frozen=True)
class IssuedDevice:
    device_id: str
    serial_hex: str
    certificate_pem: str
    findings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IssueResult:
    batch_id: str
    devices: list[IssuedDevice]
    chain_pem: list[str]  # issuing CA first, root excluded
    root_pem: str


class BulkRejectedError(ValidationError):
    code = "bulk_rejected"


def _line_error(line: int, exc: FleetTrustError) -> dict[str, Any]:
    return {"line": line, "code": exc.code, "message": exc.message}


def _prepare(line: int, item: IssueRequest, max_csr_bytes: int) -> _Prepared:
    if not isinstance(item.manifest, dict):
        raise ValidationError("manifest must be a JSON object", code="manifest_malformed")
    csr = pki.load_csr(item.csr, max_bytes=max_csr_bytes)
    public_key = csr.public_key()
    pki.check_key_allowed(public_key)
    manifest = pki.normalize_manifest(item.manifest)
    device_id = item.device_id if item.device_id is not None else new_device_id()
    pki.check_device_id(device_id)
    station = item.station
    if station is not None and (not station or len(station) > 100 or not station.isprintable()):
        raise ValidationError("station must be 1-100 printable characters", code="bad_station")
    return _Prepared(
        line=line,
        device_id=device_id,
        public_key=public_key,
        key_fp=pki.public_key_fingerprint(public_key),
        manifest=json.loads(pki.canonical_json(manifest)),
        manifest_sha256=pki.manifest_hash(manifest),
        identifiers=list(pki.identifiers(manifest)),
        station=station,
    )


def _chunks(seq: list[Any], size: int) -> list[list[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _issuing_context(
    ctx: ServiceContext, session: Session, principal: Principal, batch_id: str
) -> tuple[Batch, Factory, CertificateAuthority]:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"batch {batch_id} not found", code="batch_not_found")
    check_factory_scope(principal, batch.factory_id)
    factory = session.get(Factory, batch.factory_id)
    ca = session.get(CertificateAuthority, batch.ca_id)
    assert factory is not None and ca is not None
    if factory.status != "active":
        raise PolicyError(f"factory {factory.id} is {factory.status}", code="factory_not_active")
    if batch.status != "active":
        raise PolicyError(f"batch {batch.id} is {batch.status}", code="batch_not_active")
    if batch.auth_method != "certificate":
        raise PolicyError(
            "this batch uses shared-secret devices: register them instead of issuing",
            code="batch_is_shared_secret",
        )
    if ca.key_location != "platform" or ca.key_id is None:
        raise PolicyError(
            "this factory keeps its CA key in its own token: issue at the factory and upload a"
            " signed manifest",
            code="factory_key_external",
        )
    if ca.status != "active":
        raise PolicyError(f"issuing CA {ca.id} is {ca.status}", code="ca_not_active")
    return batch, factory, ca


def _profile(ctx: ServiceContext, ca: CertificateAuthority) -> pki.DeviceProfile:
    def build() -> pki.DeviceProfile:
        assert ca.key_id is not None and ca.certificate_der is not None
        u = urls(ctx, ca.id)
        return pki.DeviceProfile(
            ctx.signer(ca.key_id),
            x509.load_der_x509_certificate(ca.certificate_der),
            organization=ctx.settings.organization,
            ocsp_url=u["ocsp"],
            ca_issuers_url=u["ca_issuers"],
        )

    profile: pki.DeviceProfile = ctx.cached("device-profile", ca.id, build)
    return profile


def issue_devices(
    ctx: ServiceContext,
    principal: Principal,
    batch_id: str,
    items: list[IssueRequest],
    *,
    key_origin: str = "device",
) -> IssueResult:
    """Issue one certificate per item into ``batch_id``, all or nothing."""
    require(principal, "admin", "factory")
    if not items:
        raise ValidationError("no devices in the request", code="empty_request")
    if len(items) > ctx.settings.max_bulk_items:
        raise ValidationError(
            f"at most {ctx.settings.max_bulk_items} devices per request, got {len(items)}",
            code="too_many_items",
        )
    now = ctx.clock.now()
    # Step 1: validate every line before touching the database; collect all errors.
    prepared: list[_Prepared] = []
    errors: list[dict[str, Any]] = []
    for line, item in enumerate(items, start=1):
        try:
            prepared.append(_prepare(line, item, 16384))
        except FleetTrustError as exc:
            errors.append(_line_error(line, exc))
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, int] = {}
    for p in prepared:
        if p.device_id in seen_ids:
            errors.append({"line": p.line, "code": "duplicate_device_id",
                           "message": f"device id {p.device_id} repeats line {seen_ids[p.device_id]}"})
        seen_ids.setdefault(p.device_id, p.line)
        if p.key_fp in seen_keys:
            errors.append({"line": p.line, "code": "key_reused",
                           "message": f"public key repeats line {seen_keys[p.key_fp]}"})
        seen_keys.setdefault(p.key_fp, p.line)

    with ctx.transaction() as session:
        batch, factory, ca = _issuing_context(ctx, session, principal, batch_id)
        # Step 2: conflicts with what the database already holds.
        by_id = {p.device_id: p for p in prepared}
        by_key = {p.key_fp: p for p in prepared}
        for chunk in _chunks(list(by_id), 500):
            for existing in session.scalars(select(Device.id).where(Device.id.in_(chunk))):
                errors.append({"line": by_id[existing].line, "code": "device_exists",
                               "message": f"device {existing} is already registered"})
        for chunk in _chunks(list(by_key), 500):
            rows = session.execute(
                select(Certificate.public_key_sha256, Certificate.device_id).where(
                    Certificate.public_key_sha256.in_(chunk)
                )
            )
            for fp, other in rows:
                errors.append({"line": by_key[fp].line, "code": "key_reused",
                               "message": f"this public key is already certified (device {other})"})
        if errors:
            errors.sort(key=lambda e: e["line"])
            if len(items) == 1:
                raise ValidationError(errors[0]["message"], code=errors[0]["code"], errors=errors)
            raise BulkRejectedError(
                f"{len(errors)} of {len(items)} lines rejected; nothing was issued",
                errors=errors,
            )
        # Step 3: reserve capacity atomically (two processes cannot overfill the batch).
        n = len(prepared)
        reserved = session.execute(
            update(Batch)
            .where(Batch.id == batch.id, Batch.issued_count + n <= Batch.planned_size)
            .values(issued_count=Batch.issued_count + n)
        ).rowcount
        if reserved != 1:
            session.refresh(batch)
            raise PolicyError(
                f"batch {batch.id} is full: {batch.issued_count} of {batch.planned_size} issued,"
                f" {n} requested",
                code="batch_full",
            )
        # Step 4: sign. Serials are fresh CSPRNG values; the primary key refuses any reuse.
        profile = _profile(ctx, ca)
        validity = ctx.settings.device_validity_days
        issued: list[tuple[_Prepared, x509.Certificate, str]] = []
        for p in prepared:
            serial = pki.new_serial()
            cert = profile.issue(
                p.public_key,
                device_id=p.device_id,
                serial=serial,
                now=now,
                validity_days=validity,
                batch_id=batch.id,
                manifest_sha256=p.manifest_sha256,
                crl_url=crl_url(ctx, ca.id, serial),
            )
            issued.append((p, cert, format(serial, "x")))
        # Step 5: hardware identifiers already claimed by another device become findings.
        findings = _hardware_conflicts(session, prepared, now)
        # Step 6: persist everything in bulk.
        weak = key_origin != "device"
        session.execute(insert(Device), [
            {"id": p.device_id, "batch_id": batch.id, "factory_id": factory.id,
             "status": "active", "auth_method": "certificate", "key_origin": key_origin,
             "weak_identity": weak, "manifest": p.manifest,
             "manifest_sha256": p.manifest_sha256.hex(), "station": p.station,
             "owner": None, "created_at": now, "last_seen_at": None}
            for p, _, _ in issued
        ])
        ders = []
        cert_rows = []
        for p, cert, serial_hex in issued:
            der = cert.public_bytes(serialization.Encoding.DER)
            ders.append(der)
            cert_rows.append({
                "serial_hex": serial_hex, "ca_id": ca.id, "kind": "device",
                "device_id": p.device_id, "subject_ca_id": None, "der": der,
                "public_key_sha256": p.key_fp, "not_before": cert.not_valid_before_utc,
                "not_after": cert.not_valid_after_utc, "status": "good", "revoked_at": None,
                "revocation_reason": None, "created_at": now,
            })
        session.execute(insert(Certificate), cert_rows)
        hw_rows = [
            {"device_id": p.device_id, "kind": k, "value": v, "created_at": now}
            for p in prepared for k, v in p.identifiers
        ]
        if hw_rows:
            session.execute(insert(HardwareIdentifier), hw_rows)
        if findings:
            session.execute(insert(Finding), [f for fs in findings.values() for f in fs])
        audit_rows = [
            {"occurred_at": now, "actor": principal.actor, "actor_role": principal.role,
             "action": "device.manufactured", "target_type": "device",
             "target_id": p.device_id, "remote_addr": principal.remote_addr,
             "details": {"batch_id": batch.id, "factory_id": factory.id, "ca_id": ca.id,
                         "serial": serial_hex, "station": p.station, "key_origin": key_origin,
                         "manifest_sha256": p.manifest_sha256.hex(),
                         "not_after": cert.not_valid_after_utc.isoformat(),
                         "findings": [f["id"] for f in findings.get(p.device_id, [])]}}
            for p, cert, serial_hex in issued
        ]
        session.execute(insert(AuditEvent), audit_rows)
        chain = ca_chain(session, ca.id)
        return IssueResult(
            batch_id=batch.id,
            devices=[
                IssuedDevice(
                    device_id=p.device_id,
                    serial_hex=serial_hex,
                    certificate_pem=_der_to_pem(der),
                    findings=[f["id"] for f in findings.get(p.device_id, [])],
                )
                for (p, _, serial_hex), der in zip(issued, ders, strict=True)
            ],
            chain_pem=[pem(c) for c in chain[:-1]],
            root_pem=pem(chain[-1]),
        )


def _der_to_pem(der: bytes) -> str:
    b64 = base64.encodebytes(der).decode().replace("\n", "")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


def _hardware_conflicts(
    session: Session, prepared: list[_Prepared], now: dt.datetime
) -> dict[str, list[dict[str, Any]]]:
    """Hardware identifiers that another device (stored or in this request) already claims."""
    claims: dict[tuple[str, str], list[str]] = defaultdict(list)
    for p in prepared:
        for ident in p.identifiers:
            claims[ident].append(p.device_id)
    keys = list(claims)
    for chunk in _chunks(keys, 400):
        rows = session.execute(
            select(HardwareIdentifier.kind, HardwareIdentifier.value, HardwareIdentifier.device_id)
            .where(tuple_(HardwareIdentifier.kind, HardwareIdentifier.value).in_(chunk))
        )
        for kind, value, other in rows:
            claims[(kind, value)].insert(0, other)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    new_ids = {p.device_id for p in prepared}
    for (kind, value), devices in claims.items():
        unique = list(dict.fromkeys(devices))
        if len(unique) < 2:
            continue
        for dev in unique:
            if dev not in new_ids:
                continue
            out[dev].append({
                "id": new_id("fnd"), "kind": "hardware_id_conflict", "severity": "high",
                "reason_code": "CONFLICTING_HARDWARE_ID", "device_id": dev,
                "evidence": {"identifier_kind": kind, "identifier_value": value,
                             "claimed_by": unique, "stage": "issuance"},
                "status": "open", "created_at": now,
            })
    return dict(out)


@dataclass(frozen=True)
class GeneratedDevice:
    issued: IssueResult
    key_format: str
    key_bytes: bytes  # encrypted PKCS#8 PEM or PKCS#12; the server keeps no copy


def issue_with_server_key(
    ctx: ServiceContext,
    principal: Principal,
    batch_id: str,
    *,
    manifest: dict[str, Any],
    passphrase: str,
    key_format: str = "pkcs8",
    device_id: str | None = None,
    station: str | None = None,
) -> GeneratedDevice:
    """For hardware that cannot make a key: generate one, issue, return it once, encrypted.

    The device is marked ``key_origin=server`` / weak identity in the registry.
    """
    if key_format not in ("pkcs8", "pkcs12"):
        raise ValidationError("key_format must be 'pkcs8' or 'pkcs12'", code="bad_key_format")
    if len(passphrase) < 12:
        raise ValidationError(
            "a passphrase of at least 12 characters is required to protect the returned key",
            code="weak_passphrase",
        )
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    result = issue_devices(
        ctx, principal, batch_id,
        [IssueRequest(csr=csr.public_bytes(serialization.Encoding.PEM), manifest=manifest,
                      device_id=device_id, station=station)],
        key_origin="server",
    )
    enc = serialization.BestAvailableEncryption(passphrase.encode())
    if key_format == "pkcs8":
        blob = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    else:
        cert = x509.load_pem_x509_certificate(result.devices[0].certificate_pem.encode())
        cas = [x509.load_pem_x509_certificate(c.encode()) for c in result.chain_pem]
        blob = pkcs12.serialize_key_and_certificates(
            result.devices[0].device_id.encode(), key, cert, cas, enc
        )
    return GeneratedDevice(issued=result, key_format=key_format, key_bytes=blob)
