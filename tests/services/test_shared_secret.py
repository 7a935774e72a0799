"""Shared-secret fallback (Azure DPS group-enrollment pattern): the group secret is shown once
and sealed at rest, device keys are HMAC-derived, challenge/response over HTTP with single-use,
device-bound, expiring nonces, weak-identity marking, and short-lived sessions."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import threading
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import select, update

from fleettrust.clock import FixedClock
from fleettrust.errors import AuthenticationError, FleetTrustError
from fleettrust.services import hierarchy, shared_secret
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import AuditEvent, Batch, Device, Finding
from tests.api.test_api import (
    TestClient,
    assert_problem,
    bearer,
    db_dump,
    make_client,
    table_counts,
)
from tests.conftest import device_csr, manifest


@dataclass
class SS:
    ctx: ServiceContext
    api: TestClient
    factory: dict[str, str]
    batch_id: str
    secret: str
    devices: list[str]

    def mac(self, device_id: str, nonce: str, secret: str | None = None) -> str:
        key = shared_secret.derive_device_key(secret or self.secret, device_id)
        return shared_secret.response_mac(key, device_id, nonce)

    def challenge(self, device_id: str) -> str:
        r = self.api.post("/v1/device-auth/challenge", json={"device_id": device_id})
        assert r.status_code == 200, r.text
        nonce: str = r.json()["nonce"]
        return nonce

    def answer(self, device_id: str, nonce: str, mac: str) -> Any:
        return self.api.post("/v1/device-auth/response",
                             json={"device_id": device_id, "nonce": nonce, "mac": mac})


@pytest.fixture
def ss(ctx: ServiceContext, factory: hierarchy.FactoryCreated) -> Any:
    fac = bearer(factory.token)
    with make_client(ctx) as api:
        r = api.post(f"/v1/factories/{factory.factory.id}/batches", headers=fac, json={
            "name": "SS-1", "product_model": "S-1", "hardware_revision": "r1",
            "planned_size": 10, "manufactured_on": "2026-11-20", "auth_method": "shared_secret"})
        assert r.status_code == 201, r.text
        batch = r.json()
        r = api.post(f"/v1/batches/{batch['id']}/devices/register", headers=fac, json={
            "items": [{"manifest": manifest(), "device_id": "sensor-a"},
                      {"manifest": manifest()}]})
        assert r.status_code == 201, r.text
        yield SS(ctx, api, fac, batch["id"], batch["group_secret"], r.json()["device_ids"])


def check_group_secret_is_shown_once_and_sealed(ss: SS) -> None:
    assert len(ss.secret) >= 43  # 256 bits, URL-safe base64
    got = ss.api.get(f"/v1/batches/{ss.batch_id}", headers=ss.factory).json()
    assert got["auth_method"] == "shared_secret"
    assert "group_secret" not in got
    assert ss.secret not in db_dump(ss.ctx)
    with ss.ctx.sessions() as s:
        batch = s.get(Batch, ss.batch_id)
        assert batch is not None
        assert batch.group_secret_enc is not None
        sealed = batch.group_secret_enc
    assert ss.secret.encode() not in sealed
    # AES-GCM under the key-store passphrase, bound to the batch row
    assert ss.ctx.secret_box.open(sealed, ss.batch_id.encode()) == ss.secret.encode()
    with pytest.raises(FleetTrustError):
        ss.ctx.secret_box.open(sealed, b"bat_other")


def check_devices_are_weak_shared_secret_identities(ss: SS) -> None:
    assert ss.devices[0] == "sensor-a"
    assert ss.devices[1].startswith("d-")
    for dev in ss.devices:
        view = ss.api.get(f"/v1/devices/{dev}", headers=ss.factory).json()
        assert view["auth_method"] == "shared_secret"
        assert view["weak_identity"] is True
        assert view["key_origin"] == "none"
        assert view["certificates"] == []
    assert ss.api.get(f"/v1/batches/{ss.batch_id}", headers=ss.factory).json()[
        "issued_count"] == 2


def test_device_key_is_hmac_of_the_group_secret() -> None:
    expected = hmac.new(b"group", b"sensor-a", hashlib.sha256).digest()
    assert shared_secret.derive_device_key("group", "sensor-a") == expected
    mac = shared_secret.response_mac(expected, "sensor-a", "n0nce")
    assert mac == hmac.new(expected, b"fleettrust-auth-v1|sensor-a|n0nce",
                           hashlib.sha256).hexdigest()


def check_challenge_response_over_http(ss: SS) -> None:
    dev = ss.devices[0]
    nonce = ss.challenge(dev)
    mac = ss.mac(dev, nonce)
    r = ss.answer(dev, nonce, mac.upper())  # hex case does not matter
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    assert r.json()["device_id"] == dev
    assert shared_secret.authenticate_session(ss.ctx, token) == dev
    assert token not in db_dump(ss.ctx)
    with ss.ctx.sessions() as s:
        d = s.get(Device, dev)
        assert d is not None
        assert d.last_seen_at is not None
        ev = s.scalars(select(AuditEvent).where(AuditEvent.action == "device.authenticated")).one()
    assert (ev.actor, ev.actor_role, ev.remote_addr) == (f"device:{dev}", "device", "testclient")
    # the same (nonce, mac) again: replay
    assert_problem(ss.answer(dev, nonce, mac), 401, "nonce_replayed")


def check_wrong_mac_burns_the_nonce_and_is_audited(ss: SS) -> None:
    dev = ss.devices[0]
    nonce = ss.challenge(dev)
    sessions = table_counts(ss.ctx)["device_sessions"]
    assert_problem(ss.answer(dev, nonce, ss.mac(dev, nonce, secret="wrong")), 401,
                   "response_invalid")
    # the failed answer consumed the nonce: the right answer now counts as a replay
    assert_problem(ss.answer(dev, nonce, ss.mac(dev, nonce)), 401, "nonce_replayed")
    with ss.ctx.sessions() as s:
        failed = list(s.scalars(select(AuditEvent).where(
            AuditEvent.action == "device.auth_failed")))
    assert table_counts(ss.ctx)["device_sessions"] == sessions
    assert [(e.target_id, e.details["reason"]) for e in failed] == [(dev, "response_invalid")]


def check_nonce_is_bound_to_its_device(ss: SS) -> None:
    a, b = ss.devices
    nonce = ss.challenge(a)
    assert_problem(ss.answer(b, nonce, ss.mac(b, nonce)), 401, "nonce_device_mismatch")
    assert_problem(ss.answer(a, nonce, ss.mac(a, nonce)), 401, "nonce_replayed")


def check_unknown_device_gets_a_useless_nonce(ss: SS) -> None:
    before = table_counts(ss.ctx)
    nonce = ss.challenge("no-such-device")
    assert_problem(ss.answer("no-such-device", nonce, ss.mac("no-such-device", nonce)), 401,
                   "nonce_unknown")
    assert table_counts(ss.ctx) == before
    assert_problem(ss.answer(ss.devices[0], "x" * 32, "0" * 64), 401, "nonce_unknown")
    for bad in ({"nonce": "with space" * 3}, {"mac": "g" * 64}, {"mac": "ab"}, {"nonce": "é" * 20}):
        body = {"device_id": ss.devices[0], "nonce": "n" * 32, "mac": "0" * 64, **bad}
        assert_problem(ss.api.post("/v1/device-auth/response", json=body), 401,
                       "response_malformed")


def check_nonce_and_session_expire(ss: SS) -> None:
    clock = FixedClock(dt.datetime.now(dt.UTC))
    ss.ctx.clock = clock
    dev = ss.devices[1]
    stale = ss.challenge(dev)
    clock.advance(seconds=shared_secret.NONCE_TTL.total_seconds())
    assert_problem(ss.answer(dev, stale, ss.mac(dev, stale)), 401, "nonce_expired")
    fresh = ss.challenge(dev)
    clock.advance(seconds=119)
    r = ss.answer(dev, fresh, ss.mac(dev, fresh))
    assert r.status_code == 200, r.text
    token = r.json()["token"]
    assert dt.datetime.fromisoformat(r.json()["expires_at"]) == clock.now() + dt.timedelta(hours=1)
    clock.advance(minutes=59)
    assert shared_secret.authenticate_session(ss.ctx, token) == dev
    clock.advance(minutes=1)
    with pytest.raises(AuthenticationError) as info:
        shared_secret.authenticate_session(ss.ctx, token)
    assert info.value.code == "session_expired"
    for bad in ("", "x" * 43, token[:-1]):
        with pytest.raises(AuthenticationError) as info:
            shared_secret.authenticate_session(ss.ctx, bad)
        assert info.value.code == "session_invalid"
    # housekeeping removes what expired long ago
    clock.advance(hours=2)
    assert shared_secret.purge_expired(ss.ctx) >= 3


def check_live_nonces_per_device_are_capped(ss: SS) -> None:
    dev = ss.devices[0]
    nonces = [ss.challenge(dev) for _ in range(shared_secret.MAX_LIVE_NONCES + 4)]
    assert shared_secret.count_live_nonces(ss.ctx, dev) == shared_secret.MAX_LIVE_NONCES
    # the newest still work, the oldest were dropped
    assert ss.answer(dev, nonces[-1], ss.mac(dev, nonces[-1])).status_code == 200
    assert_problem(ss.answer(dev, nonces[0], ss.mac(dev, nonces[0])), 401, "nonce_unknown")


def check_concurrent_answers_with_one_nonce(ss: SS) -> None:
    dev = ss.devices[0]
    nonce = ss.challenge(dev)
    mac = ss.mac(dev, nonce)
    barrier = threading.Barrier(2)
    results: list[str] = []

    def answer() -> None:
        barrier.wait()
        try:
            shared_secret.answer_challenge(ss.ctx, dev, nonce, mac, "10.0.0.1")
            results.append("ok")
        except AuthenticationError as exc:
            results.append(exc.code)

    threads = [threading.Thread(target=answer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == ["nonce_replayed", "ok"]


def check_inactive_device_gets_no_session(ss: SS) -> None:
    dev = ss.devices[0]
    with ss.ctx.transaction() as s:
        s.execute(update(Device).where(Device.id == dev).values(status="quarantined"))
    nonce = ss.challenge(dev)
    assert_problem(ss.answer(dev, nonce, ss.mac(dev, nonce)), 403, "device_quarantined")


def check_batch_kinds_do_not_mix(ss: SS, batch: hierarchy.BatchCreated,
                                factory_principal: Principal) -> None:
    before = table_counts(ss.ctx)
    assert_problem(ss.api.post(f"/v1/batches/{ss.batch_id}/devices", headers=ss.factory,
                               json={"csr": device_csr()[0], "manifest": manifest()}),
                   422, "batch_is_shared_secret")
    assert_problem(ss.api.post(f"/v1/batches/{ss.batch_id}/devices/generate", headers=ss.factory,
                               json={"manifest": manifest(), "passphrase": "p" * 16}),
                   422, "batch_is_shared_secret")
    assert_problem(ss.api.post(f"/v1/batches/{batch.batch.id}/devices/register",
                               headers=ss.factory, json={"items": [{"manifest": manifest()}]}),
                   422, "batch_is_certificate")
    assert table_counts(ss.ctx) == before
    with pytest.raises(FleetTrustError) as info:
        hierarchy.create_batch(ss.ctx, factory_principal, batch.batch.factory_id, name="X",
                               product_model="M", hardware_revision="r", planned_size=1,
                               manufactured_on=dt.date(2026, 1, 1), own_ca=True,
                               auth_method="shared_secret")
    assert info.value.status == 422


def check_registration_is_all_or_nothing(ss: SS) -> None:
    url = f"/v1/batches/{ss.batch_id}/devices/register"
    before = table_counts(ss.ctx)
    m = manifest()
    r = ss.api.post(url, headers=ss.factory, json={"items": [
        {"manifest": m, "device_id": "n-1"},
        {"manifest": {"imei": "123"}},
        {"manifest": manifest(), "device_id": "n-1"},
        {"manifest": manifest(), "device_id": "sensor-a"},
        {"manifest": manifest(), "device_id": "bad id"},
    ]})
    body = assert_problem(r, 422, "bulk_rejected")
    assert [(e["line"], e["code"]) for e in body["errors"]] == [
        (2, "manifest_invalid"), (3, "duplicate_device_id"), (4, "device_exists"),
        (5, "invalid_device_id")]
    assert_problem(ss.api.post(url, headers=ss.factory, json={
        "items": [{"manifest": manifest(), "device_id": "sensor-a"}]}), 409, "device_exists")
    assert_problem(ss.api.post(url, headers=ss.factory, json={
        "items": [{"manifest": manifest()} for _ in range(9)]}), 422, "batch_full")
    assert table_counts(ss.ctx) == before
    # a hardware identifier already registered is stored and raises a finding, not silently
    with ss.ctx.sessions() as s:
        taken = s.get(Device, "sensor-a")
        assert taken is not None
        cpu = taken.manifest["cpu_serial"]
    r = ss.api.post(url, headers=ss.factory,
                    json={"items": [{"manifest": {"cpu_serial": cpu}, "device_id": "clone"}]})
    assert r.status_code == 201, r.text
    with ss.ctx.sessions() as s:
        finding = s.scalars(select(Finding).where(Finding.device_id == "clone")).one()
    assert finding.kind == "hardware_id_conflict"
    assert finding.evidence["claimed_by"] == ["sensor-a", "clone"]


# --- the tests: one shared-secret batch per group of checks (the fixtures are the slow part) ----


def test_group_secret_and_registration(ss: SS, batch: hierarchy.BatchCreated,
                                       factory_principal: Principal) -> None:
    check_group_secret_is_shown_once_and_sealed(ss)
    check_devices_are_weak_shared_secret_identities(ss)
    check_batch_kinds_do_not_mix(ss, batch, factory_principal)
    check_registration_is_all_or_nothing(ss)


def test_challenge_response(ss: SS) -> None:
    check_challenge_response_over_http(ss)
    check_wrong_mac_burns_the_nonce_and_is_audited(ss)
    check_nonce_is_bound_to_its_device(ss)
    check_unknown_device_gets_a_useless_nonce(ss)
    check_concurrent_answers_with_one_nonce(ss)
    check_live_nonces_per_device_are_capped(ss)
    check_inactive_device_gets_no_session(ss)


def test_nonce_and_session_expire(ss: SS) -> None:
    check_nonce_and_session_expire(ss)
