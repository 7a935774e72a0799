"""Read side of the registry and token administration: factories, batches, devices, audit.

Reads are allowed to auditors; factory credentials see only their own factory. Token creation and
revocation are audited. Not here: issuance (``issuance``) and the hierarchy (``hierarchy``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from fleettrust.errors import ConflictError, NotFoundError, ValidationError
from fleettrust.services import audit
from fleettrust.services.auth import Principal, count_admins, create_token, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import check_factory_scope, load_ca_cert, pem
from fleettrust.storage.models import (
    ApiToken,
    AuditEvent,
    Batch,
    Certificate,
    CertificateAuthority,
    Device,
    Factory,
    Finding,
)

READERS = ("admin", "auditor", "factory")


def factory_view(f: Factory) -> dict[str, Any]:
    return {"id": f.id, "name": f.name, "ca_id": f.ca_id, "batch_cas": f.batch_cas,
            "key_location": f.key_location, "status": f.status,
            "created_at": f.created_at.isoformat()}


def batch_view(b: Batch) -> dict[str, Any]:
    return {"id": b.id, "factory_id": b.factory_id, "name": b.name,
            "product_model": b.product_model, "hardware_revision": b.hardware_revision,
            "planned_size": b.planned_size, "issued_count": b.issued_count,
            "manufactured_on": b.manufactured_on.isoformat(), "ca_id": b.ca_id,
            "own_ca": b.own_ca, "auth_method": b.auth_method, "status": b.status,
            "created_at": b.created_at.isoformat()}


def device_view(d: Device) -> dict[str, Any]:
    return {"id": d.id, "batch_id": d.batch_id, "factory_id": d.factory_id, "status": d.status,
            "auth_method": d.auth_method, "key_origin": d.key_origin,
            "weak_identity": d.weak_identity, "manifest": d.manifest,
            "manifest_sha256": d.manifest_sha256, "station": d.station, "owner": d.owner,
            "created_at": d.created_at.isoformat(),
            "last_seen_at": d.last_seen_at.isoformat() if d.last_seen_at else None}


def list_factories(ctx: ServiceContext, principal: Principal) -> list[dict[str, Any]]:
    require(principal, *READERS)
    with ctx.sessions() as s:
        q = select(Factory).order_by(Factory.created_at)
        if principal.role == "factory":
            q = q.where(Factory.id == principal.factory_id)
        return [factory_view(f) for f in s.scalars(q)]


def get_factory(ctx: ServiceContext, principal: Principal, factory_id: str) -> dict[str, Any]:
    require(principal, *READERS)
    check_factory_scope(principal, factory_id)
    with ctx.sessions() as s:
        f = s.get(Factory, factory_id)
        if f is None:
            raise NotFoundError(f"factory {factory_id} not found", code="factory_not_found")
        return factory_view(f)


def list_batches(
    ctx: ServiceContext, principal: Principal, factory_id: str
) -> list[dict[str, Any]]:
    require(principal, *READERS)
    check_factory_scope(principal, factory_id)
    with ctx.sessions() as s:
        return [batch_view(b) for b in s.scalars(
            select(Batch).where(Batch.factory_id == factory_id).order_by(Batch.created_at))]


def get_batch(ctx: ServiceContext, principal: Principal, batch_id: str) -> dict[str, Any]:
    require(principal, *READERS)
    with ctx.sessions() as s:
        b = s.get(Batch, batch_id)
        if b is None:
            raise NotFoundError(f"batch {batch_id} not found", code="batch_not_found")
        check_factory_scope(principal, b.factory_id)
        return batch_view(b)


def get_device(ctx: ServiceContext, principal: Principal, device_id: str) -> dict[str, Any]:
    require(principal, *READERS, "device-owner", "repair-centre")
    with ctx.sessions() as s:
        d = s.get(Device, device_id)
        if d is None or (principal.role == "device-owner" and d.owner != principal.subject):
            raise NotFoundError(f"device {device_id} not found", code="device_not_found")
        check_factory_scope(principal, d.factory_id)
        view = device_view(d)
        view["certificates"] = [
            {"serial": c.serial_hex, "ca_id": c.ca_id, "status": c.status,
             "not_before": c.not_before.isoformat(), "not_after": c.not_after.isoformat()}
            for c in s.scalars(select(Certificate).where(Certificate.device_id == device_id)
                               .order_by(Certificate.created_at))
        ]
        view["findings"] = [
            {"id": f.id, "kind": f.kind, "severity": f.severity, "reason_code": f.reason_code,
             "evidence": f.evidence, "status": f.status}
            for f in s.scalars(select(Finding).where(Finding.device_id == device_id))
        ]
        return view


def list_devices(
    ctx: ServiceContext, principal: Principal, *, batch_id: str | None = None,
    limit: int = 100, after: str | None = None,
) -> list[dict[str, Any]]:
    require(principal, *READERS, "device-owner")
    if not 1 <= limit <= 1000:
        raise ValidationError("limit must be between 1 and 1000")
    with ctx.sessions() as s:
        q = select(Device).order_by(Device.id).limit(limit)
        if batch_id:
            q = q.where(Device.batch_id == batch_id)
        if after:
            q = q.where(Device.id > after)
        if principal.role == "factory":
            q = q.where(Device.factory_id == principal.factory_id)
        if principal.role == "device-owner":
            q = q.where(Device.owner == principal.subject)
        return [device_view(d) for d in s.scalars(q)]


def list_findings(ctx: ServiceContext, principal: Principal, status: str = "open",
                  limit: int = 100) -> list[dict[str, Any]]:
    require(principal, "admin", "auditor")
    with ctx.sessions() as s:
        return [
            {"id": f.id, "kind": f.kind, "severity": f.severity, "reason_code": f.reason_code,
             "device_id": f.device_id, "evidence": f.evidence, "status": f.status,
             "created_at": f.created_at.isoformat()}
            for f in s.scalars(select(Finding).where(Finding.status == status)
                               .order_by(Finding.created_at.desc()).limit(min(limit, 1000)))
        ]


def ca_certificate(ctx: ServiceContext, ca_id: str) -> bytes:
    """DER of a CA certificate (public; served at the AIA caIssuers URL)."""
    from cryptography.hazmat.primitives import serialization

    with ctx.sessions() as s:
        ca = s.get(CertificateAuthority, ca_id)
        if ca is None or ca.certificate_der is None:
            raise NotFoundError(f"CA {ca_id} not found", code="ca_not_found")
        return load_ca_cert(ca).public_bytes(serialization.Encoding.DER)


def hierarchy(ctx: ServiceContext, principal: Principal) -> list[dict[str, Any]]:
    require(principal, *READERS)
    with ctx.sessions() as s:
        out = []
        for ca in s.scalars(select(CertificateAuthority).order_by(CertificateAuthority.created_at)):
            if principal.role == "factory" and ca.kind in ("factory", "batch") and (
                ca.factory_id != principal.factory_id
            ):
                continue
            out.append({
                "id": ca.id, "kind": ca.kind, "name": ca.name, "parent_id": ca.parent_id,
                "factory_id": ca.factory_id, "batch_id": ca.batch_id,
                "key_location": ca.key_location, "status": ca.status,
                "path_length": ca.path_length, "serial": ca.serial_hex,
                "not_after": ca.not_after.isoformat() if ca.not_after else None,
                "certificate_pem": pem(load_ca_cert(ca)) if ca.certificate_der else None,
            })
        return out


def list_audit(ctx: ServiceContext, principal: Principal, *, target_id: str | None = None,
               after_id: int = 0, limit: int = 100) -> list[dict[str, Any]]:
    require(principal, "admin", "auditor")
    with ctx.sessions() as s:
        q = select(AuditEvent).where(AuditEvent.id > after_id).order_by(AuditEvent.id)
        if target_id:
            q = q.where(AuditEvent.target_id == target_id)
        return [
            {"id": e.id, "occurred_at": e.occurred_at.isoformat(), "actor": e.actor,
             "actor_role": e.actor_role, "action": e.action, "target_type": e.target_type,
             "target_id": e.target_id, "remote_addr": e.remote_addr, "details": e.details}
            for e in s.scalars(q.limit(min(max(limit, 1), 1000)))
        ]


def issue_token(ctx: ServiceContext, principal: Principal, *, role: str, subject: str,
                factory_id: str | None = None, ttl_days: int | None = None) -> dict[str, Any]:
    require(principal, "admin")
    now = ctx.clock.now()
    with ctx.transaction() as s:
        if factory_id is not None and s.get(Factory, factory_id) is None:
            raise NotFoundError(f"factory {factory_id} not found", code="factory_not_found")
        row, token = create_token(s, role=role, subject=subject, now=now,
                                  factory_id=factory_id, ttl_days=ttl_days)
        audit.record(s, principal, "token.create", "token", row.id, now, role=role,
                     subject=subject, factory_id=factory_id, ttl_days=ttl_days)
        return {"id": row.id, "role": role, "subject": subject, "factory_id": factory_id,
                "token": token,
                "expires_at": row.expires_at.isoformat() if row.expires_at else None}


def revoke_token(ctx: ServiceContext, principal: Principal, token_id: str) -> bool:
    """Revoke an API token; False if it already was. The last admin token cannot be revoked."""
    require(principal, "admin")
    now = ctx.clock.now()
    with ctx.transaction() as s:
        row = s.get(ApiToken, token_id)
        if row is None:
            raise NotFoundError(f"token {token_id} not found", code="token_not_found")
        if row.revoked_at is not None:
            return False
        usable = row.expires_at is None or row.expires_at > now
        if row.role == "admin" and usable and count_admins(s, now) <= 1:
            raise ConflictError(
                "refusing to revoke the last admin token: create another admin token first",
                code="last_admin_token",
            )
        row.revoked_at = now
        audit.record(s, principal, "token.revoke", "token", token_id, now, role=row.role,
                     subject=row.subject, factory_id=row.factory_id)
        return True


def list_tokens(ctx: ServiceContext, principal: Principal) -> list[dict[str, Any]]:
    require(principal, "admin", "auditor")
    with ctx.sessions() as s:
        return [
            {"id": t.id, "role": t.role, "subject": t.subject, "factory_id": t.factory_id,
             "created_at": t.created_at.isoformat(),
             "expires_at": t.expires_at.isoformat() if t.expires_at else None,
             "revoked": t.revoked_at is not None}
            for t in s.scalars(select(ApiToken).order_by(ApiToken.created_at))
        ]


def count_devices(ctx: ServiceContext) -> int:
    with ctx.sessions() as s:
        return int(s.scalar(select(func.count()).select_from(Device)) or 0)
