"""API tokens and roles over HTTP: hashed storage, a distinct 401 code for each way a token is
bad, the role matrix (auditor read-only, factory scoped to its own factory, owners and the other
roles kept out of what is not theirs) and token administration by admins."""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select

from fleettrust.api.routes import router
from fleettrust.clock import FixedClock
from fleettrust.errors import AuthenticationError
from fleettrust.services import auth, hierarchy
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import ApiToken
from tests.api.test_api import (
    TestClient,
    assert_problem,
    audit_since,
    bearer,
    db_dump,
    make_client,
    max_audit_id,
    table_counts,
)
from tests.conftest import Hierarchy, device_csr, make_principal, make_token, manifest


@dataclass
class World:
    ctx: ServiceContext
    api: TestClient
    admin: str
    f1: hierarchy.FactoryCreated
    f2: hierarchy.FactoryCreated
    b1: str  # batch of f1
    b2: str  # batch of f2
    device: str  # in b1


@pytest.fixture
def world(ctx: ServiceContext, fleet: Hierarchy) -> Any:
    admin_p = make_principal(ctx, "admin", "alice")
    f1 = hierarchy.create_factory(ctx, admin_p, name="F1")
    f2 = hierarchy.create_factory(ctx, admin_p, name="F2")
    batches = [hierarchy.create_batch(ctx, admin_p, f.factory.id, name="B", product_model="M",
                                      hardware_revision="r", planned_size=10,
                                      manufactured_on=dt.date(2026, 5, 1)).batch.id
               for f in (f1, f2)]
    with make_client(ctx) as api:
        admin = make_token(ctx, "admin", "alice")
        r = api.post(f"/v1/batches/{batches[0]}/devices", headers=bearer(f1.token),
                     json={"csr": device_csr()[0], "manifest": manifest()})
        assert r.status_code == 201, r.text
        yield World(ctx, api, admin, f1, f2, batches[0], batches[1],
                    r.json()["devices"][0]["device_id"])


def check_tokens_are_stored_hashed(world: World) -> None:
    r = world.api.post("/v1/tokens", headers=bearer(world.admin),
                       json={"role": "repair-centre", "subject": "Fix-It Ltd"})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    _, token_id, secret = token.split(".")
    assert r.json()["id"] == token_id
    assert len(secret) == 43  # 256 bits
    dump = db_dump(world.ctx)
    for t in (token, secret, world.admin.split(".")[2], world.f1.token.split(".")[2]):
        assert t not in dump
    with world.ctx.sessions() as s:
        row = s.get(ApiToken, token_id)
        assert row is not None
        assert row.secret_sha256 == hashlib.sha256(secret.encode()).hexdigest()
    listed = world.api.get("/v1/tokens", headers=bearer(world.admin)).json()
    assert all("token" not in t and "secret_sha256" not in t for t in listed)


def check_each_bad_token_has_its_own_401(world: World) -> None:
    clock = FixedClock(dt.datetime.now(dt.UTC))
    world.ctx.clock = clock
    short = world.api.post("/v1/tokens", headers=bearer(world.admin),
                           json={"role": "auditor", "subject": "temp", "ttl_days": 1}).json()
    revoked = world.api.post("/v1/tokens", headers=bearer(world.admin),
                             json={"role": "auditor", "subject": "gone"}).json()
    assert world.api.delete(f"/v1/tokens/{revoked['id']}",
                            headers=bearer(world.admin)).json()["status"] == "revoked"
    assert world.api.get("/v1/factories", headers=bearer(short["token"])).status_code == 200
    clock.advance(days=1)
    prefix, token_id, secret = world.admin.split(".")
    wrong_secret = f"{prefix}.{token_id}.{'A' * 43 if secret[0] != 'A' else 'B' * 43}"
    cases = [
        ({}, "no_token"),
        ({"Authorization": f"Token {world.admin}"}, "token_malformed"),
        ({"Authorization": "Bearer "}, "token_malformed"),
        ({"Authorization": f"Bearer {world.admin}x"}, "token_malformed"),
        ({"Authorization": f"Bearer {world.admin[:-1]}"}, "token_malformed"),
        ({"Authorization": f"Bearer ft1.tok_zzzzzzzzzzzzzzzz.{secret}"}, "token_invalid"),
        (bearer(wrong_secret), "token_invalid"),
        (bearer(revoked["token"]), "token_revoked"),
        (bearer(short["token"]), "token_expired"),
    ]
    before = table_counts(world.ctx)
    for headers, code in cases:
        r = world.api.get("/v1/factories", headers=headers)
        body = assert_problem(r, 401, code)
        assert r.headers["www-authenticate"] == 'Bearer realm="fleettrust"'
        assert "token" in body["detail"].lower() or "authorization" in body["detail"].lower()
    assert table_counts(world.ctx) == before
    # the scheme name is case-insensitive
    assert world.api.get("/v1/factories",
                         headers={"Authorization": f"bearer {world.admin}"}).status_code == 200
    with pytest.raises(AuthenticationError), world.ctx.sessions() as s:
        auth.authenticate(s, short["token"], clock.now())


def _state_changing_calls(w: World) -> list[tuple[str, str, Any]]:
    """Every state-changing route with a body that would be accepted from the right caller."""
    f1 = w.f1.factory.id
    return [
        ("POST", "/v1/hierarchy/fleet-ca/csr", {"common_name": "Fleet CA 2"}),
        ("POST", "/v1/hierarchy/fleet-ca/certificate", {"certificate_pem": "x", "root_pem": "y"}),
        ("POST", "/v1/factories", {"name": "F3"}),
        ("POST", f"/v1/factories/{f1}/ca-csr", {"csr_pem": device_csr()[0]}),
        ("POST", f"/v1/factories/{f1}/batches", {
            "name": "B2", "product_model": "M", "hardware_revision": "r", "planned_size": 1,
            "manufactured_on": "2026-01-01"}),
        ("POST", f"/v1/batches/{w.b1}/devices", {"csr": device_csr()[0], "manifest": manifest()}),
        ("POST", f"/v1/batches/{w.b1}/devices/bulk",
         {"items": [{"csr": device_csr()[0], "manifest": manifest()}]}),
        ("POST", f"/v1/batches/{w.b1}/devices/generate",
         {"manifest": manifest(), "passphrase": "a long passphrase"}),
        ("POST", f"/v1/batches/{w.b1}/devices/register", {"items": [{"manifest": manifest()}]}),
        ("POST", f"/v1/devices/{w.device}/claim-code", {}),
        ("DELETE", f"/v1/devices/{w.device}/claim-code", None),
        ("POST", "/v1/claims", {"code": "FT1-" + "A" * 32}),
        ("POST", "/v1/tokens", {"role": "auditor", "subject": "x"}),
        ("DELETE", f"/v1/tokens/{w.f1.token.split('.')[1]}", None),
    ]


def check_auditor_is_read_only(world: World) -> None:
    auditor = bearer(make_token(world.ctx, "auditor", "audra"))
    calls = _state_changing_calls(world)
    mutating = {(m, r.path) for r in router.routes for m in getattr(r, "methods", set())
                if m in ("POST", "DELETE")}
    assert len(calls) == len(mutating) - 2  # all but the anonymous device-auth routes
    before = table_counts(world.ctx)
    for method, path, body in calls:
        r = world.api.request(method, path, headers=auditor, json=body)
        assert_problem(r, 403, "role_not_allowed")
    assert table_counts(world.ctx) == before
    for path in ("/v1/factories", f"/v1/factories/{world.f2.factory.id}", "/v1/audit",
                 "/v1/tokens", "/v1/findings", "/v1/hierarchy", f"/v1/batches/{world.b2}",
                 f"/v1/devices/{world.device}", "/v1/devices"):
        assert world.api.get(path, headers=auditor).status_code == 200, path


def check_factory_token_is_scoped_to_its_factory(world: World) -> None:
    f1 = bearer(world.f1.token)
    before = table_counts(world.ctx)
    assert_problem(world.api.post("/v1/factories", headers=f1, json={"name": "Rogue"}),
                   403, "role_not_allowed")
    body = assert_problem(world.api.post(f"/v1/batches/{world.b2}/devices", headers=f1, json={
        "csr": device_csr()[0], "manifest": manifest()}), 403, "wrong_factory")
    assert "another factory" in body["detail"]
    assert_problem(world.api.post(f"/v1/batches/{world.b2}/devices/bulk", headers=f1, json={
        "items": [{"csr": device_csr()[0], "manifest": manifest()}]}), 403, "wrong_factory")
    assert_problem(world.api.post(f"/v1/factories/{world.f2.factory.id}/batches", headers=f1,
                                  json={"name": "X", "product_model": "M",
                                        "hardware_revision": "r", "planned_size": 1,
                                        "manufactured_on": "2026-01-01"}), 403, "wrong_factory")
    assert_problem(world.api.get(f"/v1/factories/{world.f2.factory.id}", headers=f1),
                   403, "wrong_factory")
    assert_problem(world.api.get(f"/v1/batches/{world.b2}", headers=f1), 403, "wrong_factory")
    assert_problem(world.api.post("/v1/tokens", headers=f1,
                                  json={"role": "admin", "subject": "me"}),
                   403, "role_not_allowed")
    assert_problem(world.api.get("/v1/audit", headers=f1), 403, "role_not_allowed")
    assert table_counts(world.ctx) == before
    listed = world.api.get("/v1/factories", headers=f1).json()
    assert [f["id"] for f in listed] == [world.f1.factory.id]
    other = world.api.get("/v1/devices", headers=bearer(world.f2.token)).json()
    assert other == []


def check_owner_and_other_roles_stay_out(world: World) -> None:
    owner = bearer(make_token(world.ctx, "device-owner", "olga"))
    others = {role: bearer(make_token(world.ctx, role, f"{role}-1"))
              for role in ("release-manager", "repair-centre", "device-owner")}
    before = table_counts(world.ctx)
    for path in ("/v1/factories", f"/v1/batches/{world.b1}", "/v1/audit", "/v1/tokens",
                 "/v1/hierarchy", "/v1/findings"):
        assert_problem(world.api.get(path, headers=owner), 403, "role_not_allowed")
    assert_problem(world.api.get(f"/v1/devices/{world.device}", headers=owner),
                   404, "device_not_found")
    for tok in others.values():
        for suffix, body in (("", {"csr": device_csr()[0], "manifest": manifest()}),
                             ("/bulk", {"items": [{"csr": device_csr()[0],
                                                   "manifest": manifest()}]}),
                             ("/generate", {"manifest": manifest(),
                                            "passphrase": "a long passphrase"})):
            r = world.api.post(f"/v1/batches/{world.b1}/devices{suffix}", headers=tok, json=body)
            assert_problem(r, 403, "role_not_allowed")
    assert table_counts(world.ctx) == before


def test_admin_manages_tokens(world: World) -> None:
    admin = bearer(world.admin)
    before = max_audit_id(world.ctx)
    r = world.api.post("/v1/tokens", headers=admin, json={
        "role": "factory", "subject": "station 7", "factory_id": world.f2.factory.id,
        "ttl_days": 30})
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["expires_at"] is not None
    station = bearer(made["token"])
    assert [f["id"] for f in world.api.get("/v1/factories", headers=station).json()] == [
        world.f2.factory.id]
    r = world.api.delete(f"/v1/tokens/{made['id']}", headers=admin)
    assert r.json() == {"id": made["id"], "status": "revoked"}
    assert_problem(world.api.get("/v1/factories", headers=station), 401, "token_revoked")
    assert world.api.delete(f"/v1/tokens/{made['id']}", headers=admin).json()[
        "status"] == "already_revoked"
    events = audit_since(world.ctx, before)
    assert [e.action for e in events] == ["token.create", "token.revoke"]
    for e in events:
        assert (e.actor, e.actor_role, e.remote_addr) == ("admin:alice", "admin", "testclient")
        assert e.target_id == made["id"]
    assert events[0].details["factory_id"] == world.f2.factory.id
    # bad requests
    for body, status, code in (
        ({"role": "superuser", "subject": "x"}, 422, "invalid_input"),
        ({"role": "factory", "subject": "x"}, 422, "invalid_input"),
        ({"role": "auditor", "subject": "x", "factory_id": world.f1.factory.id}, 422,
         "invalid_input"),
        ({"role": "factory", "subject": "x", "factory_id": "fac_nope"}, 404,
         "factory_not_found"),
        ({"role": "auditor", "subject": "\x00bad"}, 422, "invalid_input"),
        ({"role": "auditor", "subject": "x", "ttl_days": 0}, 422, "invalid_request"),
    ):
        assert_problem(world.api.post("/v1/tokens", headers=admin, json=body), status, code)
    # the last usable admin token cannot be revoked; with a second one it can
    last = world.admin.split(".")[1]
    with world.ctx.sessions() as s:
        others = list(s.scalars(select(ApiToken.id).where(ApiToken.role == "admin",
                                                          ApiToken.id != last)))
    assert others
    for token_id in others:
        assert world.api.delete(f"/v1/tokens/{token_id}", headers=admin).status_code == 200
    assert_problem(world.api.delete(f"/v1/tokens/{last}", headers=admin), 409,
                   "last_admin_token")
    second = world.api.post("/v1/tokens", headers=admin,
                            json={"role": "admin", "subject": "bob"}).json()
    assert world.api.delete(f"/v1/tokens/{last}", headers=admin).status_code == 200
    assert_problem(world.api.get("/v1/tokens", headers=admin), 401, "token_revoked")
    assert world.api.get("/v1/tokens", headers=bearer(second["token"])).status_code == 200


# --- the tests: one world per group of checks (the fixtures are the slow part) ------------------


def test_token_storage_and_authentication_failures(world: World) -> None:
    check_tokens_are_stored_hashed(world)
    check_each_bad_token_has_its_own_401(world)


def test_role_matrix(world: World) -> None:
    check_auditor_is_read_only(world)
    check_factory_token_is_scoped_to_its_factory(world)
    check_owner_and_other_roles_stay_out(world)
