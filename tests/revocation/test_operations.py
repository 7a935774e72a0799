"""Revocation operations against real databases (SQLite file and PostgreSQL): exact sets,
idempotence, preview counts, hold / release, refusals that write nothing, large operations."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import select

from fleettrust.clock import FixedClock
from fleettrust.errors import AuthorizationError, NotFoundError, ValidationError
from fleettrust.revocation.index import RevocationIndex
from fleettrust.revocation.models import RevocationOperation
from fleettrust.services import hierarchy
from fleettrust.services import revocation as rev
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import AuditEvent, Batch, CertificateAuthority, Factory, Revocation
from tests.conftest import make_principal
from tests.revocation.revocation_support import (
    cert_status,
    counts,
    device_status,
    issue,
)


def own_ca_batch(ctx: ServiceContext, admin: Principal, factory_id: str,
                 name: str = "B-own") -> hierarchy.BatchCreated:
    return hierarchy.create_batch(ctx, admin, factory_id, name=name, product_model="TH-100",
                                  hardware_revision="r2", planned_size=50,
                                  manufactured_on=dt.date(2026, 11, 20), own_ca=True)


def test_revoke_device_is_exact_idempotent_and_audited(
    ctx: ServiceContext, admin: Principal, batch: hierarchy.BatchCreated
) -> None:
    a, b = issue(ctx, admin, batch.batch.id, 2)
    index = RevocationIndex(ctx)
    index.load()
    p = rev.preview(ctx, admin, "device", a.device_id)
    assert (p["covered"], p["would_revoke"], p["devices"]) == (1, 1, 1)

    r = rev.revoke_device(ctx, admin, a.device_id, "keyCompromise")
    assert (r.covered, r.newly_revoked, r.ca_ids_revoked) == (1, 1, [])
    assert r.first_seq is not None
    assert r.first_seq == r.last_seq
    assert cert_status(ctx, a.serial_hex) == "revoked"
    assert cert_status(ctx, b.serial_hex) == "good"
    assert device_status(ctx, a.device_id) == "revoked"
    assert device_status(ctx, b.device_id) == "active"

    events = index.sync()
    assert [(e.serial_hex, e.action, e.reason, e.operation_id) for e in events] == [
        (a.serial_hex, "revoke", "keyCompromise", r.operation_id)]
    st = index.status(a.serial_hex)
    assert st is not None
    assert st.status == "revoked"
    assert st.seq == r.first_seq
    assert index.status(b.serial_hex) is None

    again = rev.revoke_device(ctx, admin, a.device_id, "superseded")
    assert (again.covered, again.newly_revoked, again.first_seq) == (1, 0, None)
    assert index.sync() == []
    st2 = index.status(a.serial_hex)
    assert st2 is not None
    assert st2.reason == "keyCompromise"
    with ctx.sessions() as s:
        actions = [e.action for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action.like("%revoc%")
                                     | AuditEvent.action.like("certificate.%")))]
        ops = s.scalars(select(RevocationOperation)).all()
    assert actions.count("revocation.device") == 2
    assert actions.count("certificate.revoked") == 1
    assert [op.state for op in ops] == ["done", "done"]


def test_revoke_batch_without_own_ca_is_exact(
    ctx: ServiceContext, admin: Principal, factory: hierarchy.FactoryCreated,
    batch: hierarchy.BatchCreated,
) -> None:
    other = hierarchy.create_batch(ctx, admin, factory.factory.id, name="other",
                                   product_model="TH-100", hardware_revision="r2",
                                   planned_size=10, manufactured_on=dt.date(2026, 11, 20))
    mine = issue(ctx, admin, batch.batch.id, 3)
    theirs = issue(ctx, admin, other.batch.id, 2)
    rev.revoke_device(ctx, admin, mine[0].device_id)  # one already revoked
    p = rev.preview(ctx, admin, "batch", batch.batch.id)
    assert (p["covered"], p["already_revoked"], p["would_revoke"], p["devices"]) == (3, 1, 2, 2)

    r = rev.revoke_batch(ctx, admin, batch.batch.id, "cessationOfOperation")
    assert (r.covered, r.newly_revoked, r.ca_ids_revoked) == (3, 2, [])
    assert r.last_seq is not None
    assert r.first_seq is not None
    assert r.last_seq - r.first_seq == 1
    assert {cert_status(ctx, d.serial_hex) for d in mine} == {"revoked"}
    assert {cert_status(ctx, d.serial_hex) for d in theirs} == {"good"}
    assert {device_status(ctx, d.device_id) for d in theirs} == {"active"}
    with ctx.sessions() as s:
        b = s.get(Batch, batch.batch.id)
        f = s.get(Factory, factory.factory.id)
        assert b is not None
        assert b.status == "revoked"
        assert f is not None
        assert f.status == "active"
    again = rev.revoke_batch(ctx, admin, batch.batch.id)
    assert (again.covered, again.newly_revoked) == (3, 0)
    assert rev.preview(ctx, admin, "batch", batch.batch.id)["would_revoke"] == 0


def test_revoke_batch_with_own_ca_revokes_the_ca(
    ctx: ServiceContext, admin: Principal, factory: hierarchy.FactoryCreated
) -> None:
    b = own_ca_batch(ctx, admin, factory.factory.id)
    devs = issue(ctx, admin, b.batch.id, 2)
    p = rev.preview(ctx, admin, "batch", b.batch.id)
    assert (p["covered"], p["would_revoke"], p["ca_ids"]) == (3, 3, [b.batch.ca_id])
    r = rev.revoke_batch(ctx, admin, b.batch.id, "keyCompromise")
    assert (r.covered, r.newly_revoked, r.ca_ids_revoked) == (3, 3, [b.batch.ca_id])
    with ctx.sessions() as s:
        ca = s.get(CertificateAuthority, b.batch.ca_id)
        assert ca is not None
        assert ca.status == "revoked"
        assert ca.serial_hex is not None
        ca_serial = ca.serial_hex
        row = s.scalars(select(Revocation).where(Revocation.serial_hex == ca_serial)).one()
    assert (row.kind, row.ca_id) == ("ca", factory.ca.id)  # listed by the factory CA
    assert cert_status(ctx, ca_serial) == "revoked"
    assert {cert_status(ctx, d.serial_hex) for d in devs} == {"revoked"}
    again = rev.revoke_batch(ctx, admin, b.batch.id)
    assert (again.covered, again.newly_revoked, again.ca_ids_revoked) == (3, 0, [])


def test_revoke_whole_factory(
    ctx: ServiceContext, admin: Principal, factory: hierarchy.FactoryCreated,
    batch: hierarchy.BatchCreated,
) -> None:
    own = own_ca_batch(ctx, admin, factory.factory.id)
    plain = issue(ctx, admin, batch.batch.id, 2)
    under_own = issue(ctx, admin, own.batch.id, 2)
    other_factory = hierarchy.create_factory(ctx, admin, name="Elsewhere")
    other_batch = hierarchy.create_batch(ctx, admin, other_factory.factory.id, name="X",
                                         product_model="M", hardware_revision="r",
                                         planned_size=5, manufactured_on=dt.date(2026, 1, 1))
    outsider = issue(ctx, admin, other_batch.batch.id, 1)[0]
    p = rev.preview(ctx, admin, "factory", factory.factory.id)
    # 4 devices + the batch CA certificate (a leaf of the factory CA) + the factory CA's own
    assert (p["covered"], p["would_revoke"], p["devices"]) == (6, 6, 4)
    r = rev.revoke_factory(ctx, admin, factory.factory.id, "cACompromise")
    assert (r.covered, r.newly_revoked) == (6, 6)
    assert sorted(r.ca_ids_revoked) == sorted([factory.ca.id, own.batch.ca_id])
    assert {cert_status(ctx, d.serial_hex) for d in plain + under_own} == {"revoked"}
    assert cert_status(ctx, outsider.serial_hex) == "good"
    with ctx.sessions() as s:
        assert {b.status for b in s.scalars(select(Batch).where(
            Batch.factory_id == factory.factory.id))} == {"revoked"}
        f = s.get(Factory, factory.factory.id)
        assert f is not None
        assert f.status == "revoked"
    assert rev.revoke_factory(ctx, admin, factory.factory.id).newly_revoked == 0


def test_breach_window_boundaries(
    ctx: ServiceContext, admin: Principal, factory: hierarchy.FactoryCreated,
    batch: hierarchy.BatchCreated,
) -> None:
    t0 = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(minutes=1)
    clock = FixedClock(t0)
    ctx.clock = clock
    own = own_ca_batch(ctx, admin, factory.factory.id)
    before = issue(ctx, admin, batch.batch.id, 1)[0]  # before the window
    clock.advance(seconds=10)
    at_start = issue(ctx, admin, batch.batch.id, 1)[0]  # exactly issued_after: included
    at_start_own = issue(ctx, admin, own.batch.id, 1)[0]
    clock.advance(seconds=10)
    at_end = issue(ctx, admin, batch.batch.id, 1)[0]  # exactly issued_before: excluded
    after, end = t0 + dt.timedelta(seconds=10), t0 + dt.timedelta(seconds=20)
    p = rev.preview(ctx, admin, "factory", factory.factory.id, after, end)
    assert (p["scope"], p["covered"], p["would_revoke"], p["ca_ids"]) == ("window", 2, 2, [])
    r = rev.revoke_factory(ctx, admin, factory.factory.id, "keyCompromise",
                           issued_after=after, issued_before=end)
    assert (r.covered, r.newly_revoked, r.ca_ids_revoked) == (2, 2, [])
    assert cert_status(ctx, before.serial_hex) == "good"
    assert cert_status(ctx, at_start.serial_hex) == "revoked"
    assert cert_status(ctx, at_start_own.serial_hex) == "revoked"
    assert cert_status(ctx, at_end.serial_hex) == "good"
    assert device_status(ctx, at_start.device_id) == "revoked"  # no good certificate left
    assert device_status(ctx, at_end.device_id) == "active"
    with ctx.sessions() as s:
        f = s.get(Factory, factory.factory.id)
        ca = s.get(CertificateAuthority, own.batch.ca_id)
        assert f is not None
        assert f.status == "active"
        assert ca is not None
        assert ca.status == "active"
    # Open-ended windows and idempotence.
    r2 = rev.revoke_factory(ctx, admin, factory.factory.id, issued_after=after)
    assert (r2.covered, r2.newly_revoked) == (3, 1)
    r3 = rev.revoke_factory(ctx, admin, factory.factory.id, issued_before=after)
    assert (r3.covered, r3.newly_revoked) == (1, 1)
    assert rev.preview(ctx, admin, "factory", factory.factory.id)["would_revoke"] == 2  # CAs


def test_suspend_release_round_trip(
    ctx: ServiceContext, admin: Principal, batch: hierarchy.BatchCreated
) -> None:
    d = issue(ctx, admin, batch.batch.id, 1)[0]
    index = RevocationIndex(ctx)
    index.load()
    r = rev.suspend_device(ctx, admin, d.device_id)
    assert (r.covered, r.newly_revoked) == (1, 1)
    assert cert_status(ctx, d.serial_hex) == "hold"
    assert device_status(ctx, d.device_id) == "suspended"
    index.sync()
    st = index.status(d.serial_hex)
    assert st is not None
    assert (st.status, st.reason) == ("hold", "certificateHold")
    assert rev.suspend_device(ctx, admin, d.device_id).newly_revoked == 0

    r = rev.release_device(ctx, admin, d.device_id)
    assert (r.covered, r.newly_revoked) == (1, 1)
    assert cert_status(ctx, d.serial_hex) == "good"
    assert device_status(ctx, d.device_id) == "active"
    ev = index.sync()
    assert [(e.action, e.reason) for e in ev] == [("release", "removeFromCRL")]
    assert index.status(d.serial_hex) is None
    assert rev.release_device(ctx, admin, d.device_id).newly_revoked == 0

    # A hold then a revocation: revoked wins, and a release no longer applies.
    rev.suspend_device(ctx, admin, d.device_id)
    assert rev.revoke_device(ctx, admin, d.device_id).newly_revoked == 1
    assert rev.release_device(ctx, admin, d.device_id).newly_revoked == 0
    assert cert_status(ctx, d.serial_hex) == "revoked"
    index.sync()
    st = index.status(d.serial_hex)
    assert st is not None
    assert st.status == "revoked"


def test_bad_inputs_are_refused_precisely_and_write_nothing(
    ctx: ServiceContext, admin: Principal, factory: hierarchy.FactoryCreated,
    batch: hierarchy.BatchCreated,
) -> None:
    d = issue(ctx, admin, batch.batch.id, 1)[0]
    auditor = make_principal(ctx, "auditor", "audrey")
    factory_p = make_principal(ctx, "factory", "line", factory.factory.id)
    before = counts(ctx)
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    cases: list[tuple[type[Exception], str, object]] = [
        (NotFoundError, "device_not_found", lambda: rev.revoke_device(ctx, admin, "d-nope")),
        (NotFoundError, "batch_not_found", lambda: rev.revoke_batch(ctx, admin, "bat_nope")),
        (NotFoundError, "factory_not_found", lambda: rev.revoke_factory(ctx, admin, "fac_x")),
        (NotFoundError, "device_not_found", lambda: rev.suspend_device(ctx, admin, "d-x")),
        (NotFoundError, "device_not_found", lambda: rev.release_device(ctx, admin, "d-x")),
        (ValidationError, "bad_reason",
         lambda: rev.revoke_device(ctx, admin, d.device_id, "compromised")),
        (ValidationError, "bad_reason",
         lambda: rev.revoke_device(ctx, admin, d.device_id, "certificateHold")),
        (ValidationError, "bad_reason",
         lambda: rev.revoke_batch(ctx, admin, batch.batch.id, "removeFromCRL")),
        (ValidationError, "bad_window",
         lambda: rev.revoke_factory(ctx, admin, factory.factory.id, issued_after=t,
                                    issued_before=t)),
        (ValidationError, "bad_window",
         lambda: rev.revoke_factory(ctx, admin, factory.factory.id,
                                    issued_after=t + dt.timedelta(days=1), issued_before=t)),
        (ValidationError, "bad_window",
         lambda: rev.revoke_factory(ctx, admin, factory.factory.id,
                                    issued_after=dt.datetime(2026, 1, 1))),  # naive
        (ValidationError, "bad_window",
         lambda: rev.preview(ctx, admin, "batch", batch.batch.id, issued_after=t)),
        (ValidationError, "bad_scope", lambda: rev.preview(ctx, admin, "fleet", "x")),
        (AuthorizationError, "role_not_allowed",
         lambda: rev.revoke_device(ctx, auditor, d.device_id)),
        (AuthorizationError, "role_not_allowed",
         lambda: rev.revoke_batch(ctx, factory_p, batch.batch.id)),
        (AuthorizationError, "role_not_allowed",
         lambda: rev.suspend_device(ctx, auditor, d.device_id)),
        (AuthorizationError, "role_not_allowed",
         lambda: rev.preview(ctx, factory_p, "device", d.device_id)),
    ]
    for exc_type, code, call in cases:
        with pytest.raises(exc_type) as info:
            call()  # type: ignore[operator]
        assert info.value.code == code, (code, info.value.message)  # type: ignore[attr-defined]
    assert counts(ctx) == before
    # The auditor may preview.
    assert rev.preview(ctx, auditor, "device", d.device_id)["covered"] == 1
    assert cert_status(ctx, d.serial_hex) == "good"


def test_large_operation_is_in_force_at_once_and_written_after(
    ctx: ServiceContext, admin: Principal, factory: hierarchy.FactoryCreated,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Above INLINE_LIMIT the decision commits first (rules), the rows follow."""
    monkeypatch.setattr(rev, "INLINE_LIMIT", 2)
    monkeypatch.setattr(rev, "SQLITE_CHUNK", 2)  # several transactions on SQLite
    monkeypatch.setattr(rev._kicker, "kick", lambda ctx: None)  # write them ourselves below
    b = own_ca_batch(ctx, admin, factory.factory.id)
    devs = issue(ctx, admin, b.batch.id, 4)
    index = RevocationIndex(ctx)
    index.load()
    r = rev.revoke_batch(ctx, admin, b.batch.id, "keyCompromise")
    assert (r.covered, r.newly_revoked, r.first_seq) == (5, 5, None)
    status = rev.operation_status(ctx, admin, r.operation_id)
    assert (status["state"], status["rows_written"]) == ("pending", 1)  # the batch CA's row
    assert rev.preview(ctx, admin, "batch", b.batch.id)["would_revoke"] == 0
    index.sync()
    d = devs[0]
    assert index.status(d.serial_hex) is None  # no per-certificate row yet...
    st = index.check(d.serial_hex, ca_id=b.batch.ca_id, batch_id=b.batch.id)
    assert st is not None
    assert st.operation_id == r.operation_id
    assert rev.materialize_pending(ctx) == 1
    status = rev.operation_status(ctx, admin, r.operation_id)
    assert (status["state"], status["rows_written"]) == ("done", 5)
    events = index.sync()
    assert {e.serial_hex for e in events} == {x.serial_hex for x in devs}
    assert {device_status(ctx, x.device_id) for x in devs} == {"revoked"}
    assert rev.materialize_pending(ctx) == 0
    # A following operation counts exactly (the pending one was finished first).
    assert rev.revoke_batch(ctx, admin, b.batch.id).newly_revoked == 0


def test_index_follows_another_context(ctx: ServiceContext, admin: Principal,
                                       batch: hierarchy.BatchCreated) -> None:
    d = issue(ctx, admin, batch.batch.id, 1)[0]
    other = ServiceContext.create(ctx.settings)
    try:
        index = RevocationIndex(other)
        index.load()
        seen: list[int] = []
        index.subscribe(lambda ev: seen.extend(e.seq for e in ev))
        r = rev.revoke_device(ctx, admin, d.device_id)
        assert index.last_seq < (r.last_seq or 0)
        index.sync()
        assert seen == [r.last_seq]
        assert index.last_seq == r.last_seq
        assert index.status(d.serial_hex) is not None
    finally:
        other.close()
