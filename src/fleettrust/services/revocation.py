"""Revocation operations: one device, one batch, a whole factory, a breach window; hold/release.

An operation has two parts (ADR 0008 explains why, with measurements):

**The decision** — one transaction, a few statements whatever the number of certificates:

1. Authorise (admin; auditors may only :func:`preview`) and validate every input before the
   database is touched (reason name, window bounds, ids).
2. Finish writing any earlier operation (see below), so the counts of this one are exact.
3. Take the decision lock and resolve the target (unknown ids: :class:`NotFoundError`, nothing
   written). Count what the scope covers and what is not revoked yet (one ``SELECT``).
4. Record the operation — its scope as data (``revocation_operations``) — and revoke the CA
   certificates it covers, the CA, batch and factory rows (a handful of rows).
5. One audit event with the counts and the operation id (plus one ``certificate.revoked`` event
   per certificate for single-device operations).

From the commit on the operation is in force: the revocation index answers "revoked" for every
certificate in the scope (:meth:`RevocationIndex.check`), so the gateway refuses those devices
and the CRLs list them, even before step 6 has written a row per certificate.

**The per-certificate log** — step 6: one ``revocations`` row (a feed event with its ``seq``)
per certificate whose state changes, the ``certificates`` and ``devices`` rows updated, and one
``status_changes`` row per affected device, all by set-based ``INSERT ... SELECT`` /
``UPDATE ... WHERE`` statements, never a loop over rows. An operation covering at most
:data:`INLINE_LIMIT` certificates does this inside its decision transaction (so a device
revocation is entirely one transaction); a larger one is written in one more transaction right
after the commit, by a background thread of the deciding process and, should that process die,
by any process calling :func:`materialize_pending` (the CRL publisher of every server does so
every second). Writing is idempotent: it selects only certificates not yet in the target state,
so a second process doing the same writes nothing twice, and repeating a whole operation is a
no-op (``newly_revoked == 0``).

Writers are serialised (``pg_advisory_xact_lock`` on PostgreSQL; SQLite serialises writers with
``BEGIN IMMEDIATE``), so ``revocations.seq`` values become visible in commit order: a reader that
follows ``seq > last`` never skips a row that commits late.

What is covered:

- ``revoke_device``: every device certificate of the device; the device becomes ``revoked``.
- ``revoke_batch``: every device certificate of the batch's devices; with a batch CA, that CA's
  certificate and every leaf it issued. Batch and devices become ``revoked``.
- ``revoke_factory`` (whole): the factory CA, all its batch CAs and every leaf they issued, and
  every device of the factory; the factory, its batches and devices become ``revoked``.
- ``revoke_factory`` with a window: only *device* certificates the factory's CAs issued
  (``certificates.created_at``, the instant fleettrust signed them) in
  ``[issued_after, issued_before)``; no CA is revoked; a device becomes ``revoked`` only when it
  has no good certificate left.
- ``suspend_device`` / ``release_device``: certificateHold on every good certificate of the
  device / lift it (RFC 5280 removeFromCRL semantics: the entry leaves the complete CRLs and the
  delta CRLs list it with reason removeFromCRL).

Not here: CRL building and publication (``fleettrust.revocation``), enforcement (the gateway
consults the revocation index), OCSP, the device feed.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import (
    ColumnElement,
    Integer,
    String,
    and_,
    case,
    exists,
    false,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from fleettrust.errors import ConflictError, NotFoundError, ValidationError
from fleettrust.ids import new_id
from fleettrust.revocation.models import RevocationOperation
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

log = logging.getLogger("fleettrust.revocation")

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
#: Operations covering at most this many certificates write their per-certificate rows in the
#: decision transaction.
INLINE_LIMIT: Final = 2_000
#: PostgreSQL advisory lock keys: decisions ("ftdecide") and revocation-log writers
#: ("ftrevoke"). Always taken in this order.
DECISION_LOCK_KEY: Final = 0x6674_6465_6369_6465
WRITER_LOCK_KEY: Final = 0x6674_7265_766F_6B65
_FINAL_DEVICE_STATUSES: Final = ("revoked", "decommissioned")
#: certificates.rowid per SQLite transaction when writing a large operation's rows.
SQLITE_CHUNK: Final = 10_000


def _rowid() -> ColumnElement[int]:
    return literal_column("certificates.rowid", Integer())


@dataclass(frozen=True)
class RevocationResult:
    """What one operation did.

    ``covered`` counts every certificate in the operation's scope (leaves and CA certificates);
    ``newly_revoked`` those whose state this call changed (for a suspension: put on hold; for a
    release: taken off hold). ``first_seq``/``last_seq`` bound the ``revocations`` rows the
    operation wrote; they are ``None`` when nothing changed and for a large operation whose
    per-certificate rows are still being written (:func:`operation_status` has them later).
    """

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


# --- validation ---------------------------------------------------------------------------------


def _check_reason(reason: object) -> str:
    if not isinstance(reason, str) or reason not in REASONS:
        raise ValidationError(
            f"unknown revocation reason {reason!r}; RFC 5280 reasons: "
            f"{', '.join(sorted(REASONS - {'certificateHold'}))}",
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
    after: object, before: object
) -> tuple[dt.datetime | None, dt.datetime | None]:
    for name, value in (("issued_after", after), ("issued_before", before)):
        if value is not None and (not isinstance(value, dt.datetime) or value.tzinfo is None):
            raise ValidationError(f"{name} must be a timezone-aware date and time",
                                  code="bad_window")
    a = after.astimezone(dt.UTC) if isinstance(after, dt.datetime) else None
    b = before.astimezone(dt.UTC) if isinstance(before, dt.datetime) else None
    if a is not None and b is not None and a >= b:
        raise ValidationError(
            f"issued_after ({a.isoformat()}) must be before issued_before ({b.isoformat()}):"
            " the window is [issued_after, issued_before)",
            code="bad_window",
        )
    return a, b


def _check_id(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= 64:
        raise NotFoundError(f"{what} {value!r} not found", code=f"{what}_not_found")
    return value


# --- scopes, as data (an operation row) and as SQL ----------------------------------------------


def _new_op(scope: str, target_id: str, action: str, reason: str | None, now: dt.datetime,
            principal: Principal) -> RevocationOperation:
    return RevocationOperation(
        id=new_id("rop"), scope=scope, target_id=target_id, action=action, reason=reason,
        revoked_at=now, batch_id=None, factory_id=None, ca_ids=[], leaf_ca_ids=[],
        issued_after=None, issued_before=None, covered=0, newly_revoked=0, state="pending",
        first_seq=None, last_seq=None, actor=principal.actor, created_at=now, done_at=None,
    )


def _resolve_device(session: Session, op: RevocationOperation) -> None:
    if session.get(Device, op.target_id) is None:
        raise NotFoundError(f"device {op.target_id} not found", code="device_not_found")


def _resolve_batch(session: Session, op: RevocationOperation) -> None:
    batch = session.get(Batch, op.target_id)
    if batch is None:
        raise NotFoundError(f"batch {op.target_id} not found", code="batch_not_found")
    op.batch_id = batch.id
    if batch.own_ca:
        op.ca_ids = [batch.ca_id]


def _resolve_factory(session: Session, op: RevocationOperation) -> None:
    factory = session.get(Factory, op.target_id)
    if factory is None:
        raise NotFoundError(f"factory {op.target_id} not found", code="factory_not_found")
    ca_ids = list(session.scalars(
        select(CertificateAuthority.id).where(
            CertificateAuthority.factory_id == factory.id,
            CertificateAuthority.kind.in_(("factory", "batch")),
        ).order_by(CertificateAuthority.kind.desc(), CertificateAuthority.id)
    ))
    if factory.ca_id not in ca_ids:
        ca_ids.insert(0, factory.ca_id)
    if op.scope == "window":
        op.leaf_ca_ids = ca_ids
    else:
        op.factory_id = factory.id
        op.ca_ids = ca_ids


def leaf_scope(op: RevocationOperation) -> ColumnElement[bool]:
    """WHERE clause over ``certificates``: the certificates ``op`` covers below its CAs (device
    certificates; for an operation that revokes CAs, everything those CAs issued)."""
    is_device = Certificate.kind == "device"
    if op.scope == "device":
        return and_(is_device, Certificate.device_id == op.target_id)
    if op.scope == "window":
        conds = [is_device, Certificate.ca_id.in_(op.leaf_ca_ids) if op.leaf_ca_ids else false()]
        if op.issued_after is not None:
            conds.append(Certificate.created_at >= op.issued_after)
        if op.issued_before is not None:
            conds.append(Certificate.created_at < op.issued_before)
        return and_(*conds)
    if op.ca_ids:
        # A batch with its own CA, or a factory: their devices' certificates were all issued by
        # these CAs (renewal keeps the issuing CA), and everything the CAs issued is revoked
        # (device certificates, sub-CA and OCSP responder certificates alike).
        return Certificate.ca_id.in_(op.ca_ids)
    if op.batch_id is not None:
        return and_(is_device, Certificate.device_id.in_(
            select(Device.id).where(Device.batch_id == op.batch_id)))
    return false()


def ca_scope(op: RevocationOperation) -> ColumnElement[bool]:
    """WHERE clause over ``certificates``: the CA certificates ``op`` revokes."""
    if not op.ca_ids:
        return false()
    # Those issued by a CA outside the set (a batch CA certificate issued by the factory CA is
    # already a "leaf" of the factory CA): the two scopes never overlap.
    return and_(Certificate.kind == "ca", Certificate.ca_id.not_in(op.ca_ids),
                Certificate.serial_hex.in_(
                    select(CertificateAuthority.serial_hex)
                    .where(CertificateAuthority.id.in_(op.ca_ids)).scalar_subquery()))


def device_scope(op: RevocationOperation) -> ColumnElement[bool] | None:
    """WHERE clause over ``devices`` for operations that revoke whole devices (else ``None``)."""
    if op.scope == "device":
        return Device.id == op.target_id
    if op.scope == "batch":
        return Device.batch_id == op.batch_id
    if op.scope == "factory":
        return Device.factory_id == op.factory_id
    return None


# --- the writers --------------------------------------------------------------------------------


def _lock(session: Session, key: int) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def _max_seq(session: Session) -> int:
    return int(session.scalar(select(func.max(Revocation.seq))) or 0)


def _target_status(action: str) -> tuple[str, ColumnElement[bool]]:
    """(new certificate status, WHERE over certificates that still need the change)."""
    if action == "revoke":
        return "revoked", Certificate.status != "revoked"
    if action == "hold":
        return "hold", Certificate.status == "good"
    return "good", Certificate.status == "hold"


def _log_and_update(session: Session, op: RevocationOperation, where: ColumnElement[bool],
                    serials: Sequence[str] | None = None) -> int:
    """Append a ``revocations`` row for every certificate matching ``where`` (and, if given,
    among ``serials``) that is not in the operation's target state yet, give those certificates
    that state, and update their devices; return how many. A few set-based statements."""
    new_status, pending = _target_status(op.action)
    cond = and_(where, pending)
    if serials is not None:
        cond = and_(cond, Certificate.serial_hex.in_(serials))
    before = _max_seq(session)
    rows = select(
        Certificate.serial_hex, Certificate.ca_id, Certificate.device_id, Certificate.kind,
        literal(op.action, String()), literal(op.reason, String()),
        literal(op.revoked_at, UTCDateTime()), literal(op.id, String()),
    ).where(cond)
    session.execute(insert(Revocation).from_select(
        ["serial_hex", "ca_id", "device_id", "kind", "action", "reason", "revoked_at",
         "operation_id"], rows))
    # (rowcount of INSERT ... SELECT is -1 with SQLAlchemy 2.1 + psycopg: count instead)
    n = int(session.scalar(select(func.count()).select_from(Revocation)
                           .where(Revocation.seq > before)) or 0)
    if n == 0:
        return 0
    values: dict[str, Any] = {"status": new_status}
    if new_status == "good":
        values.update(revoked_at=None, revocation_reason=None)
    else:
        values.update(revoked_at=op.revoked_at, revocation_reason=op.reason)
    if session.get_bind().dialect.name == "sqlite":
        # SQLite: the write lock is held since BEGIN IMMEDIATE, so the same condition selects
        # exactly the rows just logged, and walks them in storage order (by-serial lookups hit
        # random pages: 10x slower for 100,000 rows).
        target = update(Certificate).where(cond)
    else:
        # PostgreSQL: another transaction may have added a certificate to the scope since the
        # INSERT; join on the rows just logged (a hash join, not 100,000 index probes).
        target = update(Certificate).where(Certificate.serial_hex == Revocation.serial_hex,
                                           Revocation.seq > before)
    session.execute(target.values(**values).execution_options(synchronize_session=False))
    if op.action == "revoke" and device_scope(op) is None:
        _revoke_touched_devices(session, op, before)
    return n


def _revoke_touched_devices(session: Session, op: RevocationOperation, before: int) -> None:
    """Devices with a certificate revoked since ``before``: mark them revoked (whole-device
    scopes; a window only when no good certificate is left) and log one status change each."""
    touched = Device.id.in_(
        select(Revocation.device_id)
        .where(Revocation.seq > before, Revocation.device_id.is_not(None)).scalar_subquery())
    live = and_(touched, Device.status.not_in(_FINAL_DEVICE_STATUSES))
    if op.scope == "window":
        live = and_(live, ~exists().where(Certificate.device_id == Device.id,
                                          Certificate.status == "good"))
    session.execute(update(Device).where(live)
                    .values(status="revoked", status_reason=_status_reason(op))
                    .execution_options(synchronize_session=False))
    session.execute(insert(StatusChange).from_select(
        ["device_id", "serial_hex", "status", "reason", "created_at"],
        select(Device.id, literal(None, String()),
               case((Device.status == "revoked", "revoked"), else_="cert_revoked"),
               literal(_status_reason(op), String()), literal(op.revoked_at, UTCDateTime()))
        .where(touched)))


def _status_reason(op: RevocationOperation) -> str:
    return f"revoked: {op.reason} ({op.id})"


def _finish(session: Session, op: RevocationOperation, now: dt.datetime) -> None:
    """Last step of writing an operation: devices without certificates in a whole-device scope
    (shared-secret devices), then the operation's seq range."""
    devices = device_scope(op)
    if op.action == "revoke" and devices is not None:
        live = and_(devices, Device.status.not_in(_FINAL_DEVICE_STATUSES))
        session.execute(insert(StatusChange).from_select(
            ["device_id", "serial_hex", "status", "reason", "created_at"],
            select(Device.id, literal(None, String()), literal("revoked", String()),
                   literal(_status_reason(op), String()), literal(op.revoked_at, UTCDateTime()))
            .where(live)))
        session.execute(update(Device).where(live)
                        .values(status="revoked", status_reason=_status_reason(op))
                        .execution_options(synchronize_session=False))
    lo, hi = session.execute(
        select(func.min(Revocation.seq), func.max(Revocation.seq))
        .where(Revocation.operation_id == op.id)).one()
    op.first_seq = int(lo) if lo is not None else None
    op.last_seq = int(hi) if hi is not None else None
    op.state = "done"
    op.done_at = now


def materialize(ctx: ServiceContext, operation_id: str) -> None:
    """Write every per-certificate row of a decided operation (idempotent: only certificates
    not yet in the target state are written, so a second process doing the same at the same
    time writes nothing twice).

    PostgreSQL: one transaction (readers are never blocked by it). SQLite: one transaction per
    :data:`SQLITE_CHUNK` row ids of ``certificates``, because SQLite has one writer at a time
    and fleettrust's SQLite sessions all begin with ``BEGIN IMMEDIATE``: a 100,000-row
    transaction would stall every other request for seconds.
    """
    if ctx.engine.dialect.name != "sqlite":
        _write_rows(ctx, operation_id, None)
        return
    with ctx.sessions() as session:
        op = session.scalars(
            select(RevocationOperation).where(RevocationOperation.id == operation_id)).one()
        lo, hi = session.execute(select(func.min(_rowid()), func.max(_rowid()))
                                 .where(leaf_scope(op))).one()
    if lo is not None:
        for start in range(int(lo), int(hi) + 1, SQLITE_CHUNK):
            if not _write_rows(ctx, operation_id, (start, start + SQLITE_CHUNK)):
                return
    _write_rows(ctx, operation_id, None)


def _write_rows(ctx: ServiceContext, operation_id: str,
                rowids: tuple[int, int] | None) -> bool:
    """One transaction of :func:`materialize`: the rows in ``rowids`` (``[lo, hi)``), or all
    that remain and the operation's end when ``None``. False if the operation is done."""
    with ctx.transaction() as session:
        _lock(session, WRITER_LOCK_KEY)
        sqlite = session.get_bind().dialect.name == "sqlite"
        if sqlite:
            # Every dirty page stays in memory until commit instead of spilling to the WAL
            # again and again (the default cache is 2 MB); reset below.
            session.execute(text("PRAGMA cache_size = -262144"))
        try:
            op = session.scalars(
                select(RevocationOperation).where(RevocationOperation.id == operation_id)).one()
            if op.state == "done":
                return False
            if rowids is not None:
                rowid = _rowid()
                _log_and_update(session, op, and_(leaf_scope(op), rowid >= rowids[0],
                                                  rowid < rowids[1]))
            else:
                _log_and_update(session, op, leaf_scope(op))
                _finish(session, op, ctx.clock.now())
            return True
        finally:
            if sqlite:
                session.execute(text("PRAGMA cache_size = -2000"))


def materialize_pending(ctx: ServiceContext) -> int:
    """Finish every operation whose per-certificate rows are not all written; return how many.

    Safe to call from several threads and processes at once.
    """
    done = 0
    while True:
        with ctx.sessions() as session:
            pending = list(session.scalars(
                select(RevocationOperation.id).where(RevocationOperation.state == "pending")
                .order_by(RevocationOperation.seq)))
        if not pending:
            return done
        for op_id in pending:
            materialize(ctx, op_id)
            done += 1


class _Kicker:
    """One background writer thread per service context (step 6 after the decision)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: dict[int, threading.Thread] = {}
        self._again: set[int] = set()

    def kick(self, ctx: ServiceContext) -> None:
        key = id(ctx)
        with self._lock:
            thread = self._threads.get(key)
            if thread is not None and thread.is_alive():
                self._again.add(key)
                return
            thread = threading.Thread(target=self._run, args=(ctx,), daemon=True,
                                      name="revocation-writer")
            self._threads[key] = thread
        thread.start()

    def _run(self, ctx: ServiceContext) -> None:
        key = id(ctx)
        while True:
            try:
                materialize_pending(ctx)
            except Exception:
                log.exception("writing revocation rows failed; a later run resumes")
            with self._lock:
                if key not in self._again:
                    self._threads.pop(key, None)
                    return
                self._again.discard(key)


_kicker = _Kicker()


def _has_pending(session: Session) -> bool:
    return session.scalar(select(RevocationOperation.seq).where(
        RevocationOperation.state == "pending").limit(1)) is not None


def _decide(
    ctx: ServiceContext,
    principal: Principal,
    make_op: Callable[[dt.datetime], RevocationOperation],
    resolve: Callable[[Session, RevocationOperation], None],
    extra: dict[str, Any],
) -> RevocationResult:
    for _ in range(20):
        materialize_pending(ctx)  # Step 2: earlier operations first, so counts are exact
        now = ctx.clock.now()
        with ctx.transaction() as session:
            _lock(session, DECISION_LOCK_KEY)  # Step 3
            if _has_pending(session):  # another decision slipped in: write it first
                continue
            op = make_op(now)
            resolve(session, op)
            result = _decide_in(session, principal, op, extra)
        if op.state == "pending":
            _kicker.kick(ctx)
        return result
    raise ConflictError("too many concurrent revocation operations; retry",
                        code="revocation_busy")


def _decide_in(session: Session, principal: Principal, op: RevocationOperation,
               extra: dict[str, Any]) -> RevocationResult:
    leaves, cas = leaf_scope(op), ca_scope(op)
    _, pending = _target_status(op.action)
    in_scope = or_(leaves, cas) if op.ca_ids else leaves
    if op.action != "revoke":  # hold / release never touch revoked certificates
        in_scope = and_(in_scope, Certificate.status != "revoked")
    if op.ca_ids and op.action == "revoke":
        # Everything the CAs issued: count it from the (ca_id, ...) index alone, and what is
        # revoked already from the log (a certificate is revoked at most once: final state).
        issued = int(session.scalar(select(func.count()).select_from(Certificate)
                                    .where(Certificate.ca_id.in_(op.ca_ids))) or 0)
        revoked = int(session.scalar(select(func.count()).select_from(Revocation).where(
            Revocation.ca_id.in_(op.ca_ids), Revocation.action == "revoke")) or 0)
        ca_total, ca_changing = session.execute(
            select(func.count(), func.coalesce(func.sum(case((pending, 1), else_=0)), 0))
            .select_from(Certificate).where(cas)).one()
        covered, changing = issued + int(ca_total), issued - revoked + int(ca_changing)
    else:
        covered, changing = session.execute(
            select(func.count(), func.coalesce(func.sum(case((pending, 1), else_=0)), 0))
            .select_from(Certificate).where(in_scope)).one()
    op.covered, op.newly_revoked = int(covered), int(changing)
    session.add(op)
    session.flush()
    # Step 4: the CA certificates and rows (a handful), written now whatever the size.
    _lock(session, WRITER_LOCK_KEY)
    ca_ids_revoked: list[str] = []
    if op.ca_ids:
        _log_and_update(session, op, cas)
        ca_ids_revoked = list(session.scalars(
            select(CertificateAuthority.id).where(CertificateAuthority.id.in_(op.ca_ids),
                                                  CertificateAuthority.status != "revoked")
            .order_by(CertificateAuthority.id)))
        session.execute(update(CertificateAuthority)
                        .where(CertificateAuthority.id.in_(ca_ids_revoked))
                        .values(status="revoked").execution_options(synchronize_session=False))
    if op.action == "revoke" and op.scope == "batch":
        session.execute(update(Batch).where(Batch.id == op.batch_id, Batch.status != "revoked")
                        .values(status="revoked").execution_options(synchronize_session=False))
    if op.action == "revoke" and op.scope == "factory":
        session.execute(update(Batch).where(Batch.factory_id == op.factory_id,
                                            Batch.status != "revoked")
                        .values(status="revoked").execution_options(synchronize_session=False))
        session.execute(update(Factory).where(Factory.id == op.factory_id,
                                              Factory.status != "revoked")
                        .values(status="revoked").execution_options(synchronize_session=False))
    before = _max_seq(session)
    # Step 6 inline for small operations.
    if op.newly_revoked <= INLINE_LIMIT:
        _log_and_update(session, op, leaves)
        _finish(session, op, op.revoked_at)
    _step_audit(session, principal, op, before, ca_ids_revoked, extra)
    return RevocationResult(op.id, op.covered, op.newly_revoked, ca_ids_revoked,
                            op.first_seq, op.last_seq)


def _step_audit(session: Session, principal: Principal, op: RevocationOperation, before: int,
                ca_ids_revoked: list[str], extra: dict[str, Any]) -> None:
    """Step 5: one event for the operation; per-certificate events for one device."""
    if op.scope == "device" and op.state == "done":
        action = {"revoke": "certificate.revoked", "hold": "certificate.hold",
                  "release": "certificate.released"}[op.action]
        rows = session.execute(
            select(Revocation.serial_hex, Revocation.device_id, Revocation.ca_id,
                   Revocation.reason)
            .where(Revocation.seq > before, Revocation.operation_id == op.id)
            .order_by(Revocation.seq)).all()
        audit.record_many(session, principal, action, "certificate", op.revoked_at, (
            (serial, {"device_id": device_id, "ca_id": ca_id, "reason": reason,
                      "operation_id": op.id})
            for serial, device_id, ca_id, reason in rows))
    name = {"revoke": f"revocation.{op.scope}", "hold": "revocation.suspend",
            "release": "revocation.release"}[op.action]
    audit.record(
        session, principal, name, "factory" if op.scope == "window" else op.scope,
        op.target_id, op.revoked_at, operation_id=op.id, reason=op.reason, covered=op.covered,
        newly_revoked=op.newly_revoked, ca_ids_revoked=ca_ids_revoked,
        first_seq=op.first_seq, last_seq=op.last_seq, written=op.state, **extra)


# --- public operations -------------------------------------------------------------------------


def revoke_device(
    ctx: ServiceContext, principal: Principal, device_id: str, reason: str = "unspecified"
) -> RevocationResult:
    """Revoke every certificate of one device and mark the device revoked."""
    require(principal, "admin")
    _check_reason(reason)
    target = _check_id(device_id, "device")
    return _decide(ctx, principal,
                   lambda now: _new_op("device", target, "revoke", reason, now, principal),
                   _resolve_device, {})


def revoke_batch(
    ctx: ServiceContext, principal: Principal, batch_id: str, reason: str = "unspecified"
) -> RevocationResult:
    """Revoke every certificate of a batch's devices (and the batch CA if the batch has one)."""
    require(principal, "admin")
    _check_reason(reason)
    target = _check_id(batch_id, "batch")
    return _decide(ctx, principal,
                   lambda now: _new_op("batch", target, "revoke", reason, now, principal),
                   _resolve_batch, {})


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
    target = _check_id(factory_id, "factory")
    window = after is not None or before is not None

    def make(now: dt.datetime) -> RevocationOperation:
        op = _new_op("window" if window else "factory", target, "revoke", reason, now,
                     principal)
        op.issued_after, op.issued_before = after, before
        return op

    extra: dict[str, Any] = {}
    if window:
        extra = {"issued_after": after.isoformat() if after else None,
                 "issued_before": before.isoformat() if before else None}
    return _decide(ctx, principal, make, _resolve_factory, extra)


def suspend_device(ctx: ServiceContext, principal: Principal, device_id: str) -> RevocationResult:
    """Put every good certificate of a device on hold (certificateHold); an active device
    becomes ``suspended`` (a quarantined one stays quarantined: the hold refuses it anyway)."""
    require(principal, "admin")
    return _hold_or_release(ctx, principal, _check_id(device_id, "device"), hold=True)


def release_device(ctx: ServiceContext, principal: Principal, device_id: str) -> RevocationResult:
    """Lift the hold of every held certificate of a device (removeFromCRL); a ``suspended``
    device becomes ``active`` again. Revoked certificates stay revoked."""
    require(principal, "admin")
    return _hold_or_release(ctx, principal, _check_id(device_id, "device"), hold=False)


def _hold_or_release(ctx: ServiceContext, principal: Principal, device_id: str, *,
                     hold: bool) -> RevocationResult:
    action, reason = ("hold", "certificateHold") if hold else ("release", REMOVE_FROM_CRL)

    def resolve(session: Session, op: RevocationOperation) -> None:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"device {device_id} not found", code="device_not_found")
        previous = device.status
        if hold and device.status == "active":
            device.status, device.status_reason = "suspended", f"certificateHold ({op.id})"
        elif not hold and device.status == "suspended":
            device.status, device.status_reason = "active", None
        changed = session.scalar(select(func.count()).select_from(Certificate).where(
            leaf_scope(op), _target_status(op.action)[1]))
        if changed or previous != device.status:
            session.add(StatusChange(device_id=device_id, serial_hex=None, status=device.status,
                                     reason=reason, created_at=op.revoked_at))

    return _decide(ctx, principal,
                   lambda now: _new_op("device", device_id, action, reason, now, principal),
                   resolve, {})


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
    window = after is not None or before is not None
    if scope != "factory" and window:
        raise ValidationError("an issuance window applies to factory revocations only",
                              code="bad_window")
    target = _check_id(target_id, scope)
    now = ctx.clock.now()
    op = _new_op("window" if window else scope, target, "revoke", None, now, principal)
    op.issued_after, op.issued_before = after, before
    resolvers = {"device": _resolve_device, "batch": _resolve_batch,
                 "factory": _resolve_factory}
    with ctx.sessions() as session:
        resolvers[scope](session, op)
        leaves = leaf_scope(op)
        where = or_(leaves, ca_scope(op)) if op.ca_ids else leaves
        by_status = {str(k): int(v) for k, v in session.execute(
            select(Certificate.status, func.count()).where(where)
            .group_by(Certificate.status)).all()}
        # Operations decided but not fully written yet: their certificates count as revoked.
        covered = sum(by_status.values())
        already = by_status.get("revoked", 0)
        pending_ops = session.scalars(select(RevocationOperation).where(
            RevocationOperation.state == "pending", RevocationOperation.action == "revoke")).all()
        if pending_ops:
            already += int(session.scalar(select(func.count()).select_from(Certificate).where(
                where, Certificate.status != "revoked",
                or_(*[leaf_scope(p) for p in pending_ops]))) or 0)
        ca_ids: list[str] = []
        if op.ca_ids:
            ca_ids = list(session.scalars(select(CertificateAuthority.id).where(
                CertificateAuthority.id.in_(op.ca_ids), CertificateAuthority.status != "revoked"
            ).order_by(CertificateAuthority.id)))
        devices_where = device_scope(op)
        if devices_where is not None:
            devices = int(session.scalar(select(func.count()).select_from(Device).where(
                devices_where, Device.status.not_in(_FINAL_DEVICE_STATUSES))) or 0)
        else:
            devices = int(session.scalar(
                select(func.count(func.distinct(Certificate.device_id))).where(
                    leaves, Certificate.status != "revoked")) or 0)
    return {
        "scope": op.scope,
        "target_id": target,
        "issued_after": after.isoformat() if after else None,
        "issued_before": before.isoformat() if before else None,
        "covered": covered,
        "already_revoked": already,
        "on_hold": by_status.get("hold", 0),
        "would_revoke": covered - already,
        "devices": devices,
        "ca_ids": ca_ids,
    }


def operation_status(ctx: ServiceContext, principal: Principal,
                     operation_id: str) -> dict[str, Any]:
    """One operation: its scope, counts, and whether its per-certificate rows are all written."""
    require(principal, "admin", "auditor")
    with ctx.sessions() as session:
        op = session.scalars(select(RevocationOperation).where(
            RevocationOperation.id == operation_id)).first()
        if op is None:
            raise NotFoundError(f"revocation operation {operation_id} not found",
                                code="operation_not_found")
        written = int(session.scalar(select(func.count()).select_from(Revocation).where(
            Revocation.operation_id == op.id)) or 0)
        return operation_view(op) | {"rows_written": written}


def operation_view(op: RevocationOperation) -> dict[str, Any]:
    return {
        "operation_id": op.id, "scope": op.scope, "target_id": op.target_id,
        "action": op.action, "reason": op.reason, "revoked_at": op.revoked_at.isoformat(),
        "batch_id": op.batch_id, "factory_id": op.factory_id, "ca_ids": list(op.ca_ids),
        "leaf_ca_ids": list(op.leaf_ca_ids),
        "issued_after": op.issued_after.isoformat() if op.issued_after else None,
        "issued_before": op.issued_before.isoformat() if op.issued_before else None,
        "covered": op.covered, "newly_revoked": op.newly_revoked, "state": op.state,
        "first_seq": op.first_seq, "last_seq": op.last_seq, "actor": op.actor,
    }


def list_operations(ctx: ServiceContext, principal: Principal,
                    limit: int = 100) -> list[dict[str, Any]]:
    require(principal, "admin", "auditor")
    if not 1 <= limit <= 1000:
        raise ValidationError("limit must be between 1 and 1000")
    with ctx.sessions() as session:
        return [operation_view(op) for op in session.scalars(
            select(RevocationOperation).order_by(RevocationOperation.seq.desc()).limit(limit))]


__all__ = [
    "INLINE_LIMIT",
    "REASONS",
    "REMOVE_FROM_CRL",
    "RevocationResult",
    "ca_scope",
    "device_scope",
    "leaf_scope",
    "list_operations",
    "materialize",
    "materialize_pending",
    "operation_status",
    "preview",
    "release_device",
    "revoke_batch",
    "revoke_device",
    "revoke_factory",
    "suspend_device",
]
