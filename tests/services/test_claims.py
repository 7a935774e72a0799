"""QR-code claiming: 160-bit single-use codes stored hashed, expiry, revocation, replacement,
concurrent claims, per-account rate limiting across processes, owner visibility, audit."""

from __future__ import annotations

import base64
import datetime as dt
import threading
from typing import Any

import pytest
from sqlalchemy import select

from fleettrust.clock import FixedClock
from fleettrust.errors import (
    AuthorizationError,
    ConflictError,
    FleetTrustError,
    NotFoundError,
    RateLimitedError,
)
from fleettrust.services import claims, hierarchy, issuance
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import AuditEvent, ClaimCode, Device
from tests.api.test_api import assert_problem, bearer, db_dump, make_client
from tests.conftest import device_csr, make_principal, make_token, manifest


def new_device(ctx: ServiceContext, who: Principal, batch_id: str) -> str:
    res = issuance.issue_devices(ctx, who, batch_id,
                                 [issuance.IssueRequest(csr=device_csr()[0], manifest=manifest())])
    return res.devices[0].device_id


@pytest.fixture
def device(ctx: ServiceContext, factory_principal: Principal,
           batch: hierarchy.BatchCreated) -> str:
    return new_device(ctx, factory_principal, batch.batch.id)


def raises(code: str, fn: Any, *args: Any) -> FleetTrustError:
    with pytest.raises(FleetTrustError) as info:
        fn(*args)
    assert info.value.code == code, (info.value.code, info.value.message)
    return info.value


def test_code_is_stored_hashed_and_claimed_once(ctx: ServiceContext, admin: Principal,
                                                device: str) -> None:
    issued = claims.create_claim_code(ctx, admin, device)
    assert claims.CODE_RE.match(issued.code)
    raw = base64.b32decode(issued.code.removeprefix("FT1-"))
    assert len(raw) * 8 == 160 >= 128
    assert issued.claim_uri == f"fleettrust:claim?device={device}&code={issued.code}"
    other = claims.create_claim_code(ctx, admin, device)
    assert other.code != issued.code
    dump = db_dump(ctx)
    for code in (issued.code, other.code):
        assert code not in dump
        assert code.removeprefix("FT1-") not in dump
        assert claims.hash_code(code) in dump
    with ctx.sessions() as s:
        rows = list(s.scalars(select(ClaimCode).where(ClaimCode.device_id == device)))
    assert {r.code_sha256 for r in rows} == {claims.hash_code(issued.code),
                                             claims.hash_code(other.code)}
    issued = claims.create_claim_code(ctx, admin, device)
    bob = bearer(make_token(ctx, "device-owner", "bob@example.com"))
    carol = bearer(make_token(ctx, "device-owner", "carol@example.com"))
    # what a human types: lower case, grouped, spaces around
    typed = "ft1-" + "-".join(issued.code[4:][i:i + 4] for i in range(0, 32, 4)).lower()
    with make_client(ctx) as api:
        r = api.post("/v1/claims", headers=bob, json={"code": f"  {typed} "})
        assert r.status_code == 200, r.text
        assert r.json() == {"device_id": device, "owner": "bob@example.com"}
        for who in (bob, carol):
            assert_problem(api.post("/v1/claims", headers=who, json={"code": issued.code}),
                           409, "claim_code_used")
        view = api.get(f"/v1/devices/{device}", headers=bob)
        assert view.status_code == 200
        assert view.json()["owner"] == "bob@example.com"
        assert [d["id"] for d in api.get("/v1/devices", headers=bob).json()] == [device]
        assert_problem(api.get(f"/v1/devices/{device}", headers=carol), 404, "device_not_found")
        assert api.get("/v1/devices", headers=carol).json() == []
        # a claimed device gets no new code
        assert_problem(api.post(f"/v1/devices/{device}/claim-code",
                                headers=bearer(make_token(ctx, "admin", "root")), json={}),
                       409, "already_claimed")
    with ctx.sessions() as s:
        d = s.get(Device, device)
        assert d is not None
        assert d.owner == "bob@example.com"
        row = s.scalars(select(ClaimCode).where(ClaimCode.device_id == device,
                                                ClaimCode.used_at.is_not(None))).one()
        assert row.used_by == "bob@example.com"
        assert row.used_at is not None


def race(ctx: ServiceContext, owners: list[Principal], code: str) -> list[str]:
    """Claim ``code`` for every owner at the same moment; outcomes ("won" or error codes)."""
    barrier = threading.Barrier(len(owners))
    results: list[str] = []

    def claim(who: Principal) -> None:
        barrier.wait()
        try:
            claims.claim_device(ctx, who, code)
            results.append("won")
        except ConflictError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=claim, args=(o,)) for o in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return sorted(results)


def test_two_concurrent_claims_exactly_one_wins(ctx: ServiceContext, admin: Principal,
                                                factory_principal: Principal,
                                                batch: hierarchy.BatchCreated) -> None:
    owners = [make_principal(ctx, "device-owner", f"owner-{i}") for i in range(2)]
    for _ in range(3):
        dev = new_device(ctx, factory_principal, batch.batch.id)
        code = claims.create_claim_code(ctx, admin, dev).code
        assert race(ctx, owners, code) == ["claim_code_used", "won"]
        with ctx.sessions() as s:
            d = s.get(Device, dev)
            assert d is not None
            assert d.owner in ("owner-0", "owner-1")


def test_expiry_revocation_replacement_and_roles(ctx: ServiceContext, admin: Principal,
                                                 factory_principal: Principal,
                                                 batch: hierarchy.BatchCreated) -> None:
    clock = FixedClock(dt.datetime(2027, 1, 1, tzinfo=dt.UTC))
    ctx.clock = clock
    owner = make_principal(ctx, "device-owner", "dana")
    d1, d2, d3 = (new_device(ctx, factory_principal, batch.batch.id) for _ in range(3))
    # expiry
    short = claims.create_claim_code(ctx, admin, d1, ttl_days=1)
    assert short.expires_at == clock.now() + dt.timedelta(days=1)
    clock.advance(days=1)
    raises("claim_code_expired", claims.claim_device, ctx, owner, short.code)
    # revocation (by the factory that made the device)
    revoked = claims.create_claim_code(ctx, factory_principal, d2)
    assert claims.revoke_claim_codes(ctx, factory_principal, d2) == 1
    assert claims.revoke_claim_codes(ctx, factory_principal, d2) == 0
    raises("claim_code_revoked", claims.claim_device, ctx, owner, revoked.code)
    # a new code replaces the previous one
    first = claims.create_claim_code(ctx, admin, d3)
    second = claims.create_claim_code(ctx, admin, d3)
    raises("claim_code_revoked", claims.claim_device, ctx, owner, first.code)
    assert claims.claim_device(ctx, owner, second.code) == d3
    # audit: create, revoke, claim, each self-contained
    with ctx.sessions() as s:
        events = list(s.scalars(select(AuditEvent).where(AuditEvent.target_id.in_([d2, d3]))
                                .order_by(AuditEvent.id)))
    actions = [(e.action, e.target_id) for e in events if e.action != "device.manufactured"]
    assert actions == [("claim_code.create", d2), ("claim_code.revoke", d2),
                       ("claim_code.revoke", d2), ("claim_code.create", d3),
                       ("claim_code.create", d3), ("device.claim", d3)]
    claim_event = events[-1]
    assert claim_event.actor == "device-owner:dana"
    assert claim_event.actor_role == "device-owner"
    assert claim_event.remote_addr == "127.0.0.1"
    assert claim_event.details["owner"] == "dana"
    assert claim_event.occurred_at == clock.now()
    assert events[-2].details["replaced_codes"] == 1
    check_who_may_make_codes(ctx, admin, new_device(ctx, factory_principal, batch.batch.id))


def check_who_may_make_codes(ctx: ServiceContext, admin: Principal, device: str) -> None:
    other_factory = hierarchy.create_factory(ctx, admin, name="Other Line")
    stranger = make_principal(ctx, "factory", "other", other_factory.factory.id)
    owner = make_principal(ctx, "device-owner", "erin")
    auditor = make_principal(ctx, "auditor", "audra")
    assert isinstance(raises("wrong_factory", claims.create_claim_code, ctx, stranger, device),
                      AuthorizationError)
    raises("wrong_factory", claims.revoke_claim_codes, ctx, stranger, device)
    for who in (owner, auditor):
        raises("role_not_allowed", claims.create_claim_code, ctx, who, device)
        raises("role_not_allowed", claims.revoke_claim_codes, ctx, who, device)
    raises("role_not_allowed", claims.claim_device, ctx, admin, "FT1-" + "A" * 32)
    assert isinstance(raises("device_not_found", claims.create_claim_code, ctx, admin, "d-none"),
                      NotFoundError)
    raises("bad_ttl", claims.create_claim_code, ctx, admin, device, 0)


def test_guessing_is_rate_limited_per_account_across_processes(
    ctx: ServiceContext, admin: Principal, device: str,
) -> None:
    clock = FixedClock(dt.datetime.now(dt.UTC))
    ctx.clock = clock
    limit = ctx.settings.claim_failures_per_window
    window = ctx.settings.claim_failure_window_seconds
    real = claims.create_claim_code(ctx, admin, device).code
    mallory = make_token(ctx, "device-owner", "mallory")
    with make_client(ctx) as api:
        for i in range(limit):
            guess = "FT1-" + base64.b32encode(i.to_bytes(20, "big")).decode()
            body = {"code": guess} if i % 3 else {"code": "not-a-code"}
            r = api.post("/v1/claims", headers=bearer(mallory), json=body)
            assert r.status_code in (404, 422), r.text
            assert r.json()["code"] in ("claim_code_unknown", "claim_code_malformed")
        clock.advance(seconds=10)
        r = api.post("/v1/claims", headers=bearer(mallory), json={"code": real})
        body = assert_problem(r, 429, "claim_rate_limited")
        assert int(r.headers["retry-after"]) == body["retry_after"] == window - 10
        assert str(limit) in body["detail"]

    # a second server process (its own context, same database) enforces the same limit
    second = ServiceContext.create(ctx.settings, clock=clock)
    try:
        mallory_p = make_principal(second, "device-owner", "mallory")
        with pytest.raises(RateLimitedError):
            claims.claim_device(second, mallory_p, real)
        # other accounts are not affected, and the code is still good
        zoe = make_principal(second, "device-owner", "zoe")
        raises("claim_code_unknown", claims.claim_device, second, zoe, "FT1-" + "B" * 32)
        # after the window, mallory may try again
        clock.advance(seconds=window)
        assert claims.claim_device(second, mallory_p, real) == device
    finally:
        second.close()
