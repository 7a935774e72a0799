"""Revocation operations: one device, one batch, a whole factory, a breach window; hold/release.

Each operation is **one transaction** made of a handful of set-based statements, whatever the
number of certificates it covers (a 100,000-device batch is a few ``INSERT ... SELECT`` and
``UPDATE ... WHERE`` statements, never a Python loop over rows):

1. Authorise (admin; auditors may only :func:`preview`) and validate every input before the
   database is touched (reason name, window bounds, ids).
2. Take the revocation writer lock (``pg_advisory_xact_lock`` on PostgreSQL; SQLite serialises
   writers with ``BEGIN IMMEDIATE`` already). With writers serialised, ``revocations.seq`` values
   become visible in commit order, so a reader following ``seq > last`` never skips a row that
   commits late (the revocation index and the device feed rely on it).
3. Resolve the target (unknown ids are :class:`NotFoundError`, nothing written).
4. Append one ``revocations`` row per certificate whose state changes (``INSERT ... SELECT``):
   certificates already in the target state are not logged again, so repeating an operation
   is a no-op (``newly_revoked == 0``). All rows share the operation id.
5. Update the same certificates, the revoked CAs, batches, factories and devices (set-based).
6. Append one ``status_changes`` row per affected device (``INSERT ... SELECT``): every server
   process closes that device's open connections.
7. One audit event for the operation (counts, operation id, seq range). Per-certificate audit
   events (``certificate.revoked`` ...) are written only for single-device operations; for bulk
   operations the ``revocations`` rows, joined by ``operation_id``, are the per-certificate
   record.

What is covered:

- ``revoke_device``: every device certificate of the device; device status ``revoked``.
- ``revoke_batch``: every device certificate of the batch's devices, and the batch's own CA
  certificate (if it has one) plus every leaf that CA issued; batch and devices ``revoked``.
- ``revoke_factory`` (whole): every device of the factory, the factory CA and all its batch CAs
  (and every leaf they issued); factory, its batches and devices ``revoked``.
- ``revoke_factory`` with a window: only *device* certificates issued (``certificates.created_at``,
  the instant fleettrust signed them) by the factory's CAs in ``[issued_after, issued_before)``;
  no CA is revoked; a device becomes ``revoked`` only when it has no good certificate left.
- ``suspend_device`` / ``release_device``: certificateHold on every good certificate of the device
  / lift it (RFC 5280 removeFromCRL semantics: the entry leaves the CRLs and a delta CRL lists it
  with reason removeFromCRL).

Not here: CRL building and publication (``fleettrust.revocation``), enforcement (the gateway
follows the revocation index), OCSP, the device feed.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    exists,
    false,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from fleettrust.errors import NotFoundError, ValidationError
from fleettrust.ids import new_id
from fleettrust.services import audit
from fleettrust.services.auth import Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import (
    Batch,
    Certificate,
    CertificateAuthority,
    Device,
    Factory,
    Revocation,
    StatusChange,
    UTCDateTime,
)

#: RFC 5280 §5.3.1 CRLReason names accepted from operators (``removeFromCRL`` is internal: it is
#: what a release writes, and only delta CRLs carry it).
REASONS: Final = {
    "unspecified",
    "keyCompromise",
    "cACompromise",
    "affiliationChanged",
    "superseded",
    "cessationOfOperation",
    "certificateHold",
    "privilegeWithdrawn",
    "aACompromise",
}
REMOVE_FROM_CRL: Final = "removeFromCRL"
SCOPES: Final = ("device", "batch", "factory")
#: Key of the PostgreSQL advisory lock serialising revocation writers (ASCII "ftrevoke").
WRITER_LOCK_KEY: Final = 0x6674_7265_766F_6B65
_FINAL_DEVICE_STATUSES: Final = ("revoked", "decommissioned")


@dataclass(frozen=True)
class RevocationResult:
    """What one operation did. ``covered`` counts every certificate in the operation's scope
    (leaves and CA certificates); ``newly_revoked`` those whose state this call changed (for a
    suspension: put on hold; for a release: taken off hold). ``first_seq``/``last_seq`` bound the
    ``revocations`` rows written (``None`` when nothing changed)."""

    operation_id: str
    covered: int
    newly_revoked: int
    ca_ids_revoked: list[str]
    first_seq: int | None
    last_seq: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "operation_id": self.operation_id,
            "covered": self.covered,
            "newly_revoked": self.newly_revoked,
            "ca_ids_revoked": list(self.ca_ids_revoked),
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
        }


# --- scope resolution ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scope:
    """The certificates and devices one operation acts on, as SQL expressions."""

    kind: str  # device | batch | factory | window
    target_id: str
    leaves: ColumnElement[bool]  # WHERE clause over ``certificates`` selecting device certs
    ca_ids: tuple[str, ...]  # CAs whose own certificates are revoked (and their rows)
    devices: ColumnElement[bool] | None  # WHERE over ``devices`` (whole-device scopes)
    batch_ids: ColumnElement[bool] | None  # WHERE over ``batches`` marked revoked
    factory_id: str | None  # factory marked revoked


def _check_reason(reason: str) -> str:
    if not isinstance(reason, str) or reason not in REASONS:
        raise ValidationError(
            f"unknown revocation reason {reason!r}; RFC 5280 reasons: "
            f"{', '.join(sorted(REASONS))}",
            code="bad_reason",
        )
    if reason == "certificateHold":
        raise ValidationError(
            "certificateHold is not a revocation reason here: suspend the device instead"
            " (`fleettrust revoke suspend`), which can be released",
            code="bad_reason",
        )
    return reason


def _check_window(
    after: dt.datetime | None, before: dt.datetime | None
) -> tuple[dt.datetime | None, dt.datetime | None]:
    for name, value in (("issued_after", after), ("issued_before", before)):
        if value is not None and (not isinstance(value, dt.datetime) or value.tzinfo is None):
            raise ValidationError(f"{name} must be a timezone-aware datetime", code="bad_window")
    if after is not None and before is not None and after >= before:
        raise ValidationError(
            f"issued_after ({after.isoformat()}) must be before issued_before"
            f" ({before.isoformat()}): the window is [after, before)",
            code="bad_window",
        )
    return (
        after.astimezone(dt.UTC) if after is not None else None,
        before.astimezone(dt.UTC) if before is not None else None,
    )


def _device_scope(session: Session, device_id: str) -> _Scope:
    if not isinstance(device_id, str) or session.get(Device, device_id) is None:
        raise NotFoundError(f"device {device_id} not found", code="device_not_found")
    return _Scope(
        kind="device",
        target_id=device_id,
        leaves=and_(Certificate.kind == "device", Certificate.device_id == device_id),
        ca_ids=(),
        devices=Device.id == device_id,
        batch_ids=None,
        factory_id=None,
    )


def _batch_scope(session: Session, batch_id: str) -> _Scope:
    batch = session.get(Batch, batch_id) if isinstance(batch_id, str) else None
    if batch is None:
        raise NotFoundError(f"batch {batch_id} not found", code="batch_not_found")
    in_batch = Certificate.device_id.in_(select(Device.id).where(Device.batch_id == batch_id))
    leaves: ColumnElement[bool] = and_(Certificate.kind == "device", in_batch)
    ca_ids: tuple[str, ...] = ()
    if batch.own_ca:
        ca_ids = (batch.ca_id,)
        # Everything the batch CA issued is revoked with it (the CA certificate is revoked
        # anyway; listing the leaves too serves clients that check only the leaf's CRL).
        leaves = and_(Certificate.kind == "device",
                      or_(in_batch, Certificate.ca_id == batch.ca_id))
    return _Scope(
        kind="batch",
        target_id=batch_id,
        leaves=leaves,
        ca_ids=ca_ids,
        devices=Device.batch_id == batch_id,
        batch_ids=Batch.id == batch_id,
        factory_id=None,
    )


def _factory_cas(session: Session, factory_id: str) -> list[str]:
    return list(session.scalars(
        select(CertificateAuthority.id).where(
            CertificateAuthority.factory_id == factory_id,
            CertificateAuthority.kind.in_(("factory", "batch")),
        ).order_by(CertificateAuthority.kind.desc(), CertificateAuthority.id)
    ))


def _factory_scope(
    session: Session, factory_id: str, after: dt.datetime | None, before: dt.datetime | None
) -> _Scope:
    factory = session.get(Factory, factory_id) if isinstance(factory_id, str) else None
    if factory is None:
        raise NotFoundError(f"factory {factory_id} not found", code="factory_not_found")
    ca_ids = _factory_cas(session, factory_id)
    by_ca: ColumnElement[bool] = Certificate.ca_id.in_(ca_ids) if ca_ids else false()
    if after is None and before is None:
        in_factory = Certificate.device_id.in_(
            select(Device.id).where(Device.factory_id == factory_id))
        return _Scope(
            kind="factory",
            target_id=factory_id,
            leaves=and_(Certificate.kind == "device", or_(in_factory, by_ca)),
            ca_ids=tuple(ca_ids),
            devices=Device.factory_id == factory_id,
            batch_ids=Batch.factory_id == factory_id,
            factory_id=factory_id,
        )
    conds = [Certificate.kind == "device", by_ca]
    if after is not None:
        conds.append(Certificate.created_at >= after)
    if before is not None:
        conds.append(Certificate.created_at < before)
    return _Scope(
        kind="window",
        target_id=factory_id,
        leaves=and_(*conds),
        ca_ids=(),
        devices=None,
        batch_ids=None,
        factory_id=None,
    )


def _ca_certs(scope: _Scope) -> ColumnElement[bool]:
    if not scope.ca_ids:
        return false()
    return and_(Certificate.kind == "ca", Certificate.subject_ca_id.in_(scope.ca_ids))


def _in_scope(scope: _Scope) -> ColumnElement[bool]:
    return or_(scope.leaves, _ca_certs(scope)) if scope.ca_ids else scope.leaves


# --- the writer --------------------------------------------------------------------------------


def _lock(session: Session) -> None:
    """Serialise revocation writers (step 2 of the module docstring)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": WRITER_LOCK_KEY})


def _max_seq(session: Session) -> int:
    return int(session.scalar(select(func.max(Revocation.seq))) or 0)


def _log_and_update(
    session: Session,
    where: ColumnElement[bool],
    *,
    action: str,
    new_status: str,
    reason: str | None,
    now: dt.datetime,
    operation_id: str,
) -> int:
    """Append a ``revocations`` row for every certificate matching ``where`` and give those
    certificates ``new_status``; return how many. Two statements, no row loop."""
    rows = select(
        Certificate.serial_hex,
        Certificate.ca_id,
        Certificate.device_id,
        Certificate.kind,
        literal(action, String()),
        literal(reason, String()),
        literal(now, UTCDateTime()),
        literal(operation_id, String()),
    ).where(where)
    session.execute(
        insert(Revocation).from_select(
            ["serial_hex", "ca_id", "device_id", "kind", "action", "reason", "revoked_at",
             "operation_id"],
            rows,
        )
    )
    values: dict[str, Any] = {"status": new_status}
    if new_status == "good":
        values.update(revoked_at=None, revocation_reason=None)
    else:
        values.update(revoked_at=now, revocation_reason=reason)
    result = session.execute(
        update(Certificate).where(where).values(**values).execution_options(
            synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def _seq_range(session: Session, before: int) -> tuple[int | None, int | None]:
    lo, hi = session.execute(
        select(func.min(Revocation.seq), func.max(Revocation.seq)).where(Revocation.seq > before)
    ).one()
    return (int(lo) if lo is not None else None, int(hi) if hi is not None else None)


def _status_changes_from_devices(
    session: Session, where: ColumnElement[bool], status: str, reason: str, now: dt.datetime
) -> None:
    session.execute(
        insert(StatusChange).from_select(
            ["device_id", "serial_hex", "status", "reason", "created_at"],
            select(Device.id, literal(None, String()), literal(status, String()),
                   literal(reason, String()), literal(now, UTCDateTime())).where(where),
        )
    )


def _status_changes_from_log(
    session: Session, after_seq: int, status: str, reason: str, now: dt.datetime
) -> None:
    """One ``status_changes`` row per device that has a ``revocations`` row after ``after_seq``
    (rows of this operation: writers are serialised)."""
    session.execute(
        insert(StatusChange).from_select(
            ["device_id", "serial_hex", "status", "reason", "created_at"],
            select(Revocation.device_id, literal(None, String()), literal(status, String()),
                   literal(reason, String()), literal(now, UTCDateTime()))
            .where(Revocation.seq > after_seq, Revocation.device_id.is_not(None))
            .group_by(Revocation.device_id),
        )
    )


def _count(session: Session, where: ColumnElement[bool]) -> int:
    return int(session.scalar(select(func.count()).select_from(Certificate).where(where)) or 0)


def _revoke(
    ctx: ServiceContext, principal: Principal, resolve: Any, reason: str, extra: dict[str, Any]
) -> RevocationResult:
    now = ctx.clock.now()
    operation_id = new_id("rop")
    with ctx.transaction() as session:
        _lock(session)  # Step 2
        scope: _Scope = resolve(session)  # Step 3
        before = _max_seq(session)
        covered = _count(session, _in_scope(scope))
        not_revoked = Certificate.status != "revoked"
        # Step 4 + 5: log and revoke leaves and CA certificates in two statements each.
        newly = _log_and_update(session, and_(_in_scope(scope), not_revoked), action="revoke",
                                new_status="revoked", reason=reason, now=now,
                                operation_id=operation_id)
        ca_ids_revoked: list[str] = []
        if scope.ca_ids:
            ca_ids_revoked = list(session.scalars(
                select(CertificateAuthority.id).where(
                    CertificateAuthority.id.in_(scope.ca_ids),
                    CertificateAuthority.status != "revoked",
                ).order_by(CertificateAuthority.id)
            ))
            session.execute(
                update(CertificateAuthority).where(CertificateAuthority.id.in_(ca_ids_revoked))
                .values(status="revoked").execution_options(synchronize_session=False)
            )
        if scope.batch_ids is not None:
            session.execute(update(Batch).where(scope.batch_ids, Batch.status != "revoked")
                            .values(status="revoked")
                            .execution_options(synchronize_session=False))
        if scope.factory_id is not None:
            session.execute(update(Factory).where(Factory.id == scope.factory_id,
                                                  Factory.status != "revoked")
                            .values(status="revoked")
                            .execution_options(synchronize_session=False))
        # Step 5/6: devices. Whole-device scopes revoke every device in scope (shared-secret
        # devices have no certificate but are revoked too); a window revokes a device only when
        # none of its certificates is good any more.
        status_reason = f"revoked: {reason} ({operation_id})"
        if scope.devices is not None:
            live = and_(scope.devices, Device.status.not_in(_FINAL_DEVICE_STATUSES))
            _status_changes_from_devices(session, live, "revoked", status_reason, now)
            session.execute(update(Device).where(live)
                            .values(status="revoked", status_reason=status_reason)
                            .execution_options(synchronize_session=False))
        elif newly:
            _status_changes_from_log(session, before, "cert_revoked", status_reason, now)
            touched = Device.id.in_(
                select(Revocation.device_id).where(Revocation.seq > before,
                                                   Revocation.device_id.is_not(None)))
            has_good = exists().where(Certificate.device_id == Device.id,
                                      Certificate.status == "good")
            session.execute(update(Device).where(
                touched, Device.status.not_in(_FINAL_DEVICE_STATUSES), ~has_good)
                .values(status="revoked", status_reason=status_reason)
                .execution_options(synchronize_session=False))
        first_seq, last_seq = _seq_range(session, before) if newly else (None, None)
        # Step 7: audit.
        if scope.kind == "device" and newly:
            _per_certificate_audit(session, principal, "certificate.revoked", before, now,
                                   operation_id)
        audit.record(
            session, principal, f"revocation.{scope.kind}", scope.kind if scope.kind != "window"
            else "factory", scope.target_id, now,
            operation_id=operation_id, reason=reason, covered=covered, newly_revoked=newly,
            ca_ids_revoked=ca_ids_revoked, first_seq=first_seq, last_seq=last_seq, **extra,
        )
    return RevocationResult(operation_id, covered, newly, ca_ids_revoked, first_seq, last_seq)


def _per_certificate_audit(
    session: Session, principal: Principal, action: str, after_seq: int, now: dt.datetime,
    operation_id: str,
) -> None:
    rows = session.execute(
        select(Revocation.serial_hex, Revocation.device_id, Revocation.ca_id, Revocation.reason)
        .where(Revocation.seq > after_seq).order_by(Revocation.seq)
    ).all()
    audit.record_many(session, principal, action, "certificate", now, (
        (serial, {"device_id": device_id, "ca_id": ca_id, "reason": reason,
                  "operation_id": operation_id})
        for serial, device_id, ca_id, reason in rows
    ))


# --- public operations -------------------------------------------------------------------------


def revoke_device(
    ctx: ServiceContext, principal: Principal, device_id: str, reason: str = "unspecified"
) -> RevocationResult:
    """Revoke every certificate of one device and mark the device revoked."""
    require(principal, "admin")
    _check_reason(reason)
    return _revoke(ctx, principal, lambda s: _device_scope(s, device_id), reason, {})


def revoke_batch(
    ctx: ServiceContext, principal: Principal, batch_id: str, reason: str = "unspecified"
) -> RevocationResult:
    """Revoke every certificate of a batch's devices (and the batch CA if the batch has one)."""
    require(principal, "admin")
    _check_reason(reason)
    return _revoke(ctx, principal, lambda s: _batch_scope(s, batch_id), reason, {})


def revoke_factory(
    ctx: ServiceContext,
    principal: Principal,
    factory_id: str,
    reason: str = "unspecified",
    issued_after: dt.datetime | None = None,
    issued_before: dt.datetime | None = None,
) -> RevocationResult:
    """Revoke a whole factory (its CA, its batch CAs, every device), or with a window only the
    device certificates its CAs issued in ``[issued_after, issued_before)``."""
    require(principal, "admin")
    _check_reason(reason)
    after, before = _check_window(issued_after, issued_before)
    extra: dict[str, Any] = {}
    if after is not None or before is not None:
        extra = {"issued_after": after.isoformat() if after else None,
                 "issued_before": before.isoformat() if before else None}
    return _revoke(ctx, principal, lambda s: _factory_scope(s, factory_id, after, before),
                   reason, extra)


def suspend_device(ctx: ServiceContext, principal: Principal, device_id: str) -> RevocationResult:
    """Put every good certificate of a device on hold (certificateHold); an active device
    becomes ``suspended`` (a quarantined one stays quarantined: the hold refuses it anyway)."""
    require(principal, "admin")
    return _hold_or_release(ctx, principal, device_id, hold=True)


def release_device(ctx: ServiceContext, principal: Principal, device_id: str) -> RevocationResult:
    """Lift the hold of every held certificate of a device (removeFromCRL); a ``suspended``
    device becomes ``active`` again. Revoked certificates stay revoked."""
    require(principal, "admin")
    return _hold_or_release(ctx, principal, device_id, hold=False)


def _hold_or_release(
    ctx: ServiceContext, principal: Principal, device_id: str, *, hold: bool
) -> RevocationResult:
    now = ctx.clock.now()
    operation_id = new_id("rop")
    action, reason = ("hold", "certificateHold") if hold else ("release", REMOVE_FROM_CRL)
    with ctx.transaction() as session:
        _lock(session)
        scope = _device_scope(session, device_id)
        device = session.get(Device, device_id)
        assert device is not None
        before = _max_seq(session)
        covered = _count(session, and_(scope.leaves, Certificate.status != "revoked"))
        changed = _log_and_update(
            session, and_(scope.leaves, Certificate.status == ("good" if hold else "hold")),
            action=action, new_status="hold" if hold else "good", reason=reason, now=now,
            operation_id=operation_id,
        )
        previous = device.status
        if hold and device.status == "active":
            device.status, device.status_reason = "suspended", f"certificateHold ({operation_id})"
        elif not hold and device.status == "suspended":
            device.status, device.status_reason = "active", None
        if changed or previous != device.status:
            session.add(StatusChange(device_id=device_id, serial_hex=None,
                                     status=device.status, reason=reason, created_at=now))
        first_seq, last_seq = _seq_range(session, before) if changed else (None, None)
        if changed:
            _per_certificate_audit(session, principal,
                                   "certificate.hold" if hold else "certificate.released",
                                   before, now, operation_id)
        audit.record(
            session, principal, "revocation.suspend" if hold else "revocation.release",
            "device", device_id, now, operation_id=operation_id, covered=covered,
            newly_revoked=changed, first_seq=first_seq, last_seq=last_seq,
            previous_status=previous, status=device.status,
        )
    return RevocationResult(operation_id, covered, changed, [], first_seq, last_seq)


def preview(
    ctx: ServiceContext,
    principal: Principal,
    scope: str,
    target_id: str,
    issued_after: dt.datetime | None = None,
    issued_before: dt.datetime | None = None,
) -> dict[str, Any]:
    """Count what a revocation would cover, without writing anything.

    ``covered`` and ``would_revoke`` equal the ``covered`` and ``newly_revoked`` of the
    operation run at the same instant.
    """
    require(principal, "admin", "auditor")
    if scope not in SCOPES:
        raise ValidationError(f"scope must be one of {', '.join(SCOPES)}", code="bad_scope")
    after, before = _check_window(issued_after, issued_before)
    if scope != "factory" and (after is not None or before is not None):
        raise ValidationError("an issuance window applies to factory revocations only",
                              code="bad_window")
    with ctx.sessions() as session:
        if scope == "device":
            sc = _device_scope(session, target_id)
        elif scope == "batch":
            sc = _batch_scope(session, target_id)
        else:
            sc = _factory_scope(session, target_id, after, before)
        where = _in_scope(sc)
        by_status = dict(session.execute(
            select(Certificate.status, func.count()).where(where).group_by(Certificate.status)
        ).all())
        covered = sum(int(v) for v in by_status.values())
        ca_ids: list[str] = []
        if sc.ca_ids:
            ca_ids = list(session.scalars(select(CertificateAuthority.id).where(
                CertificateAuthority.id.in_(sc.ca_ids), CertificateAuthority.status != "revoked"
            ).order_by(CertificateAuthority.id)))
        if sc.devices is not None:
            devices = int(session.scalar(select(func.count()).select_from(Device).where(
                sc.devices, Device.status.not_in(_FINAL_DEVICE_STATUSES))) or 0)
        else:
            devices = int(session.scalar(
                select(func.count(func.distinct(Certificate.device_id))).where(
                    where, Certificate.status != "revoked")) or 0)
    return {
        "scope": "window" if sc.kind == "window" else scope,
        "target_id": target_id,
        "issued_after": after.isoformat() if after else None,
        "issued_before": before.isoformat() if before else None,
        "covered": covered,
        "already_revoked": int(by_status.get("revoked", 0)),
        "on_hold": int(by_status.get("hold", 0)),
        "would_revoke": covered - int(by_status.get("revoked", 0)),
        "devices": devices,
        "ca_ids": ca_ids,
    }


def revocation_log(
    ctx: ServiceContext, principal: Principal, operation_id: str, limit: int = 1000
) -> list[dict[str, Any]]:
    """The ``revocations`` rows one operation wrote (first ``limit``), for operators."""
    require(principal, "admin", "auditor")
    with ctx.sessions() as session:
        rows = session.execute(
            select(Revocation).where(Revocation.operation_id == operation_id)
            .order_by(Revocation.seq).limit(limit)
        ).scalars().all()
        if not rows:
            raise NotFoundError(f"revocation operation {operation_id} not found",
                                code="operation_not_found")
        return [{"seq": r.seq, "serial": r.serial_hex, "ca_id": r.ca_id,
                 "device_id": r.device_id, "kind": r.kind, "action": r.action,
                 "reason": r.reason, "revoked_at": r.revoked_at.isoformat()} for r in rows]


__all__ = [
    "REASONS",
    "REMOVE_FROM_CRL",
    "RevocationResult",
    "preview",
    "release_device",
    "revocation_log",
    "revoke_batch",
    "revoke_device",
    "revoke_factory",
    "suspend_device",
]
