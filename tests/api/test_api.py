"""The operator API over real HTTP (FastAPI TestClient and the live uvicorn server): OpenAPI,
the whole foundation flow, and an audit event — actor, role, remote address — for every
state-changing call.

Also home of the small HTTP helpers the other API/service tests import.
"""

from __future__ import annotations

import base64
import datetime as dt
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import func, select
from starlette.exceptions import StarletteDeprecationWarning

from fleettrust import ceremony
from fleettrust.api.app import create_app
from fleettrust.api.routes import public, router
from fleettrust.services import shared_secret
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import ApiToken, AuditEvent, Base
from tests.conftest import ROOT_PASSPHRASE, LiveServer, device_csr, make_token, manifest

with warnings.catch_warnings():
    # Starlette prefers httpx2 for its TestClient; httpx (a project dependency) works the same.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

PROBLEM = "application/problem+json"


# --- helpers shared by the API and service tests ------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def make_client(ctx: ServiceContext) -> TestClient:
    """A TestClient on the real app; server errors come back as 500 responses, not exceptions,
    so a test can show the request that caused one."""
    return TestClient(create_app(ctx), raise_server_exceptions=False)


@pytest.fixture
def api(ctx: ServiceContext) -> Iterator[TestClient]:
    with make_client(ctx) as client:
        yield client


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An RFC 9457 problem document with this status and code, and a non-empty detail."""
    assert resp.status_code == status, (resp.status_code, resp.text)
    assert resp.headers["content-type"].startswith(PROBLEM), resp.headers["content-type"]
    body: dict[str, Any] = resp.json()
    assert body["status"] == status, body
    assert body["code"] == code, body
    assert body["type"] == f"urn:fleettrust:problem:{code}"
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    return body


def table_counts(ctx: ServiceContext) -> dict[str, int]:
    with ctx.sessions() as s:
        return {t.name: int(s.scalar(select(func.count()).select_from(t)) or 0)
                for t in Base.metadata.sorted_tables}


def db_dump(ctx: ServiceContext) -> str:
    """Every row of every table as text (bytes columns as their repr and hex)."""
    parts: list[str] = []
    with ctx.sessions() as s:
        for t in Base.metadata.sorted_tables:
            for row in s.execute(select(t)):
                for value in row:
                    if isinstance(value, bytes | memoryview):
                        raw = bytes(value)
                        parts.append(repr(raw))
                        parts.append(raw.hex())
                    else:
                        parts.append(str(value))
    return "\n".join(parts)


def actor_of(ctx: ServiceContext, token: str) -> str:
    """``role:subject`` of the API token ``token`` (as audit events name their actor)."""
    with ctx.sessions() as s:
        row = s.get(ApiToken, token.split(".")[1])
        assert row is not None
        return f"{row.role}:{row.subject}"


def max_audit_id(ctx: ServiceContext) -> int:
    with ctx.sessions() as s:
        return int(s.scalar(select(func.max(AuditEvent.id))) or 0)


def audit_since(ctx: ServiceContext, after_id: int) -> list[AuditEvent]:
    with ctx.sessions() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.id > after_id)
                              .order_by(AuditEvent.id)))


def http_fleet(ctx: ServiceContext, api: TestClient, admin_token: str, root_dir: Path) -> str:
    """The fleet CA ceremony through the API plus the offline root; returns the fleet CA id."""
    now = dt.datetime.now(dt.UTC)
    info = ceremony.init_root(root_dir, passphrase=ROOT_PASSPHRASE, now=now)
    r = api.post("/v1/hierarchy/fleet-ca/csr", json={"common_name": "Fleet CA"},
                 headers=bearer(admin_token))
    assert r.status_code == 200, r.text
    cert = ceremony.sign_ca_csr(root_dir, r.json()["csr_pem"].encode(),
                                passphrase=ROOT_PASSPHRASE, now=now)
    r = api.post("/v1/hierarchy/fleet-ca/certificate", headers=bearer(admin_token), json={
        "certificate_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "root_pem": info.certificate.public_bytes(serialization.Encoding.PEM).decode()})
    assert r.status_code == 200, r.text
    fleet_ca_id: str = r.json()["fleet_ca_id"]
    return fleet_ca_id


# --- OpenAPI -------------------------------------------------------------------------------------


def test_openapi_lists_every_route(api: TestClient) -> None:
    r = api.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["info"]["title"] == "fleettrust"
    paths = spec["paths"]
    expected = set()
    for route in [*router.routes, *public.routes]:
        for method in getattr(route, "methods", set()) - {"HEAD"}:
            expected.add((method.lower(), route.path))  # type: ignore[attr-defined]
    assert len(expected) >= 25
    missing = {(m, p) for m, p in expected if m not in paths.get(p, {})}
    assert not missing, f"routes missing from /openapi.json: {sorted(missing)}"
    # request bodies are documented with their strict schemas
    schemas = spec["components"]["schemas"]
    assert schemas["FactoryIn"]["additionalProperties"] is False
    assert "csr" in schemas["DeviceIn"]["properties"]
    # and the two public meta routes behave
    assert api.get("/healthz").json() == {"status": "ok"}
    body = assert_problem(api.get("/v1/nope"), 404, "no_such_route")
    assert "/v1/nope" in body["detail"]


# --- the whole flow over HTTP, each state change audited ----------------------------------------


def test_every_state_changing_call_is_audited(ctx: ServiceContext, api: TestClient,
                                              tmp_path: Path) -> None:
    admin_token = make_token(ctx, "admin", "alice")
    owner_token = make_token(ctx, "device-owner", "bob@example.com")
    exercised: set[tuple[str, str]] = set()

    def call(method: str, template: str, path: str, token: str | None, actor: str,
             json: Any = None, status: int = 200) -> Any:
        before = max_audit_id(ctx)
        headers = bearer(token) if token else {}
        r = api.request(method, path, json=json, headers=headers)
        assert r.status_code == status, (method, path, r.text)
        events = audit_since(ctx, before)
        assert events, f"{method} {path} wrote no audit event"
        role = actor.split(":", 1)[0]
        for e in events:
            assert (e.actor, e.actor_role, e.remote_addr) == (actor, role, "testclient"), (
                method, path, e.action)
            assert e.occurred_at.tzinfo is not None
            assert isinstance(e.details, dict)
        exercised.add((method, template))
        return r.json()

    admin = "admin:alice"
    # fleet CA ceremony: CSR from the server, signed by the offline root, imported
    now = dt.datetime.now(dt.UTC)
    root_dir = tmp_path / "root"
    info = ceremony.init_root(root_dir, passphrase=ROOT_PASSPHRASE, now=now)
    csr = call("POST", "/v1/hierarchy/fleet-ca/csr", "/v1/hierarchy/fleet-ca/csr", admin_token,
               admin, json={"common_name": "Fleet CA"})["csr_pem"]
    cert = ceremony.sign_ca_csr(root_dir, csr.encode(), passphrase=ROOT_PASSPHRASE, now=now)
    imported = call("POST", "/v1/hierarchy/fleet-ca/certificate",
                    "/v1/hierarchy/fleet-ca/certificate", admin_token, admin, json={
                        "certificate_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
                        "root_pem": info.certificate.public_bytes(
                            serialization.Encoding.PEM).decode()})
    assert imported["root_fingerprint"] == info.fingerprint

    # factories: platform key (with batch CAs) and external key (CSR signed later)
    f1 = call("POST", "/v1/factories", "/v1/factories", admin_token, admin,
              json={"name": "Line 1", "batch_cas": True}, status=201)
    f1_token = f1["token"]
    f1_actor = actor_of(ctx, f1_token)
    f2 = call("POST", "/v1/factories", "/v1/factories", admin_token, admin,
              json={"name": "Line 2", "key_location": "external"}, status=201)
    assert f2["status"] == "pending_ca"
    assert f2["ca_certificate_pem"] is None
    ca_csr, _ = device_csr()
    chain = call("POST", "/v1/factories/{factory_id}/ca-csr", f"/v1/factories/{f2['id']}/ca-csr",
                 f2["token"], actor_of(ctx, f2["token"]), json={"csr_pem": ca_csr})["chain_pem"]
    assert len(chain) == 3  # factory CA, fleet CA, root

    # batches and issuance with the factory credential
    batch = call("POST", "/v1/factories/{factory_id}/batches",
                 f"/v1/factories/{f1['id']}/batches", f1_token, f1_actor,
                 json={"name": "B1", "product_model": "TH-100", "hardware_revision": "r2",
                       "planned_size": 10, "manufactured_on": "2026-11-20", "own_ca": True},
                 status=201)
    bid = batch["id"]
    csr1, _ = device_csr()
    one = call("POST", "/v1/batches/{batch_id}/devices", f"/v1/batches/{bid}/devices", f1_token,
               f1_actor, json={"csr": csr1, "manifest": manifest(), "station": "st-1"},
               status=201)
    device_id = one["devices"][0]["device_id"]
    leaf = x509.load_pem_x509_certificate(one["devices"][0]["certificate_pem"].encode())
    assert leaf.serial_number.bit_length() >= 64
    assert len(one["chain_pem"]) == 3  # batch CA, factory CA, fleet CA
    before = max_audit_id(ctx)
    bulk = call("POST", "/v1/batches/{batch_id}/devices/bulk", f"/v1/batches/{bid}/devices/bulk",
                f1_token, f1_actor, json={"items": [
                    {"csr": device_csr()[0], "manifest": manifest()} for _ in range(3)]},
                status=201)
    assert len(bulk["devices"]) == 3
    assert len(audit_since(ctx, before)) == 3  # one self-contained event per device
    gen = call("POST", "/v1/batches/{batch_id}/devices/generate",
               f"/v1/batches/{bid}/devices/generate", f1_token, f1_actor,
               json={"manifest": manifest(), "passphrase": "a long passphrase",
                     "key_format": "pkcs12"}, status=201)
    key, cert12, _ = pkcs12.load_key_and_certificates(base64.b64decode(gen["pkcs12_b64"]),
                                                      b"a long passphrase")
    assert key is not None
    assert cert12 is not None

    # shared-secret batch, registration, device challenge/response
    ss = call("POST", "/v1/factories/{factory_id}/batches", f"/v1/factories/{f1['id']}/batches",
              f1_token, f1_actor, json={"name": "SS1", "product_model": "TH-1",
                                        "hardware_revision": "r1", "planned_size": 5,
                                        "manufactured_on": "2026-11-21",
                                        "auth_method": "shared_secret"}, status=201)
    reg = call("POST", "/v1/batches/{batch_id}/devices/register",
               f"/v1/batches/{ss['id']}/devices/register", f1_token, f1_actor,
               json={"items": [{"manifest": manifest(), "device_id": "ss-dev-1"}]}, status=201)
    assert reg["device_ids"] == ["ss-dev-1"]
    nonce = api.post("/v1/device-auth/challenge", json={"device_id": "ss-dev-1"}).json()["nonce"]
    mac = shared_secret.response_mac(
        shared_secret.derive_device_key(ss["group_secret"], "ss-dev-1"), "ss-dev-1", nonce)
    session = call("POST", "/v1/device-auth/response", "/v1/device-auth/response", None,
                   "device:ss-dev-1", json={"device_id": "ss-dev-1", "nonce": nonce, "mac": mac})
    assert shared_secret.authenticate_session(ctx, session["token"]) == "ss-dev-1"

    # claim codes and claiming
    call("POST", "/v1/devices/{device_id}/claim-code", f"/v1/devices/{device_id}/claim-code",
         admin_token, admin, json={}, status=201)
    revoked = call("DELETE", "/v1/devices/{device_id}/claim-code",
                   f"/v1/devices/{device_id}/claim-code", admin_token, admin)
    assert revoked == {"revoked": 1}
    code = call("POST", "/v1/devices/{device_id}/claim-code",
                f"/v1/devices/{device_id}/claim-code", f1_token, f1_actor,
                json={"ttl_days": 30}, status=201)["code"]
    claimed = call("POST", "/v1/claims", "/v1/claims", owner_token, "device-owner:bob@example.com",
                   json={"code": code})
    assert claimed == {"device_id": device_id, "owner": "bob@example.com"}

    # tokens
    tok = call("POST", "/v1/tokens", "/v1/tokens", admin_token, admin,
               json={"role": "auditor", "subject": "eve", "ttl_days": 7}, status=201)
    call("DELETE", "/v1/tokens/{token_id}", f"/v1/tokens/{tok['id']}", admin_token, admin)

    # every state-changing route of the API was exercised above
    state_changing = {
        (m, r.path) for r in router.routes for m in getattr(r, "methods", set())
        if m in ("POST", "PUT", "PATCH", "DELETE")
    }
    unaudited = {("POST", "/v1/device-auth/challenge")}  # anonymous; only hands out a nonce
    assert state_changing - unaudited - exercised == set()

    # the public CA endpoint serves what the issuing chain says
    der = api.get(f"/ca/{batch['ca_id']}.der")
    assert der.status_code == 200
    assert der.headers["content-type"] == "application/pkix-cert"
    assert x509.load_der_x509_certificate(der.content).subject == leaf.issuer

    # what was made is readable (by an auditor) and consistent
    auditor = bearer(make_token(ctx, "auditor", "audra"))
    listed = [x["id"] for x in api.get("/v1/factories", headers=auditor).json()]
    assert sorted(listed) == sorted([f1["id"], f2["id"]])
    assert api.get(f"/v1/factories/{f2['id']}", headers=auditor).json()["status"] == "active"
    batches = api.get(f"/v1/factories/{f1['id']}/batches", headers=auditor).json()
    assert sorted(b["name"] for b in batches) == ["B1", "SS1"]
    got = api.get(f"/v1/batches/{bid}", headers=auditor).json()
    assert got["issued_count"] == 5
    assert got["own_ca"] is True
    got = api.get(f"/v1/batches/{ss['id']}", headers=auditor).json()
    assert "group_secret" not in got
    view = api.get(f"/v1/devices/{device_id}", headers=auditor).json()
    assert view["certificates"][0]["serial"] == one["devices"][0]["serial"]
    assert view["owner"] == "bob@example.com"
    assert view["station"] == "st-1"
    assert (view["weak_identity"], view["key_origin"]) == (False, "device")
    generated = api.get(f"/v1/devices/{gen['devices'][0]['device_id']}", headers=auditor).json()
    assert (generated["weak_identity"], generated["key_origin"]) == (True, "server")
    in_batch = api.get("/v1/devices", params={"batch_id": bid, "limit": 3}, headers=auditor)
    assert len(in_batch.json()) == 3
    rest = api.get("/v1/devices", headers=auditor, params={
        "batch_id": bid, "after": in_batch.json()[-1]["id"]}).json()
    assert len(rest) == 2
    kinds = sorted(c["kind"] for c in api.get("/v1/hierarchy", headers=auditor).json())
    assert kinds == ["batch", "factory", "factory", "fleet", "root"]
    actions = {e["action"] for e in api.get("/v1/audit", headers=auditor,
                                             params={"limit": 1000}).json()}
    assert {"fleet_ca.csr", "fleet_ca.import", "factory.create", "factory.ca_signed",
            "batch.create", "device.manufactured", "device.authenticated", "claim_code.create",
            "claim_code.revoke", "device.claim", "token.create", "token.revoke"} <= actions
    trail = api.get("/v1/audit", params={"target_id": device_id}, headers=auditor).json()
    assert [e["action"] for e in trail] == ["device.manufactured", "claim_code.create",
                                            "claim_code.revoke", "claim_code.create",
                                            "device.claim"]
    assert api.get("/v1/findings", headers=auditor).json() == []
    tokens = api.get("/v1/tokens", headers=auditor).json()
    assert {t["id"]: t["revoked"] for t in tokens}[tok["id"]] is True


def test_live_server_issues_over_real_http(ctx: ServiceContext, tmp_path: Path) -> None:
    admin_token = make_token(ctx, "admin", "alice")
    with LiveServer(ctx) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        with make_client(ctx) as api:
            http_fleet(ctx, api, admin_token, tmp_path / "root")
        f = http.post("/v1/factories", json={"name": "Live"}, headers=bearer(admin_token))
        assert f.status_code == 201, f.text
        b = http.post(f"/v1/factories/{f.json()['id']}/batches",
                      headers=bearer(f.json()["token"]),
                      json={"name": "L", "product_model": "M", "hardware_revision": "r",
                            "planned_size": 2, "manufactured_on": "2026-03-04"})
        assert b.status_code == 201, b.text
        r = http.post(f"/v1/batches/{b.json()['id']}/devices", headers=bearer(f.json()["token"]),
                      json={"csr": device_csr()[0], "manifest": manifest()})
        assert r.status_code == 201, r.text
        events = [e for e in audit_since(ctx, 0) if e.action == "device.manufactured"]
        assert events[-1].remote_addr == "127.0.0.1"
