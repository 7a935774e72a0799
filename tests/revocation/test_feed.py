"""The device revocation feed: formats, pages, HTTP on both listeners, SSE, the agent follower."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from fleettrust.agent_feed import (
    FeedError,
    PeerRefusedError,
    PeerRevokedError,
    RevocationFollower,
    check_peer_certificate,
    check_tls_peer,
)
from fleettrust.api.feed_routes import gateway_router
from fleettrust.revocation import feed
from fleettrust.revocation import filter as flt
from fleettrust.services import revocation as rev
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import BatchCreated
from tests.api.gateway_fixtures import RunningGateway, enroll, tls_client
from tests.revocation.feed_support import AppServer, issue_many, operator_app, wait_until

T0 = dt.datetime(2026, 11, 24, 14, 0, 0, tzinfo=dt.UTC)


def _events() -> list[feed.FeedEvent]:
    return [
        feed.FeedEvent(7, "5f3e" * 9, "ca_aaaa", "revoke", "keyCompromise", T0),
        feed.FeedEvent(8, "1", "ca_bbbb", "hold", "certificateHold", T0 + dt.timedelta(seconds=3)),
        feed.FeedEvent(10, "ff" * 20, "ca_aaaa", "release", "removeFromCRL", T0),
        feed.FeedEvent(11, "abc", "ca_aaaa", "revoke", None, T0 - dt.timedelta(days=400)),
    ]


def test_formats_round_trip_and_v2_is_compact() -> None:
    events = _events()
    page = feed.FeedPage(6, 11, 11, False, False, tuple(events))
    v1 = json.loads(feed.dumps(feed.render(page, "v1")))
    v2 = json.loads(feed.dumps(feed.render(page, "v2")))
    assert v1["events"][0] == {"seq": 7, "serial": "5f3e" * 9, "ca_id": "ca_aaaa",
                               "action": "revoke", "reason": "keyCompromise",
                               "revoked_at": "2026-11-24T14:00:00Z"}
    assert feed.decode(v1) == events
    assert feed.decode(v2) == events  # whole seconds survive exactly
    assert {k: v1[k] for k in ("since", "next", "head", "more")} == \
        {k: v2[k] for k in ("since", "next", "head", "more")}
    big = tuple(feed.FeedEvent(100 + i, format(2**150 + i * 7919, "x"), f"ca_{i % 3}", "revoke",
                               "keyCompromise", T0 + dt.timedelta(milliseconds=i))
                for i in range(500))
    bp = feed.FeedPage(99, 599, 599, False, False, big)
    n1, n2 = len(feed.dumps(feed.page_v1(bp))), len(feed.dumps(feed.page_v2(bp)))
    assert n2 * 4 < n1, (n1, n2)
    doc = feed.page_v2(bp)
    doc["count"] += 1
    with pytest.raises(ValueError, match="truncated"):
        feed.decode(doc)
    with pytest.raises(ValueError, match="unknown feed format"):
        feed.decode({"format": "v9"})


def _revoked_serials(ctx: ServiceContext) -> set[str]:
    from fleettrust.revocation.filter import revoked_at

    with ctx.sessions() as s:
        return revoked_at(s, feed.head_seq(s))


def test_pages_bounded_and_snapshot_required(ctx: ServiceContext, admin: Principal,
                                             batch: BatchCreated,
                                             factory_principal: Principal) -> None:
    devs = issue_many(ctx, factory_principal, batch.batch.id, 5)
    for d in devs[:4]:
        rev.revoke_device(ctx, admin, d.device_id, "keyCompromise")
    rev.suspend_device(ctx, admin, devs[4].device_id)
    rev.release_device(ctx, admin, devs[4].device_id)
    with ctx.sessions() as s:
        head = feed.head_seq(s)
        seqs = [e.seq for e in feed.events_after(s, 0, 100)]  # PostgreSQL may leave gaps
        assert len(seqs) == 6
        assert seqs[-1] == head
        p = feed.read_page(s, 0, limit=4)
        assert (p.next, p.more, [e.seq for e in p.events]) == (seqs[3], True, seqs[:4])
        p = feed.read_page(s, seqs[3], limit=4)
        assert (p.next, p.more) == (head, False)
        assert [e.action for e in p.events] == ["hold", "release"]
        assert p.events[0].serial_hex == devs[4].serial_hex
        assert feed.read_page(s, head).events == ()
        assert feed.read_page(s, 0, max_lag=head - 1).snapshot_required
        assert feed.read_page(s, head + 1).snapshot_required  # a position never reached
        assert not feed.read_page(s, 1, max_lag=head - 1).snapshot_required


def test_v1_pinned_agent_gets_every_revocation_after_v2(
        ctx: ServiceContext, admin: Principal, batch: BatchCreated,
        factory_principal: Principal, tmp_path: Path) -> None:
    devs = issue_many(ctx, factory_principal, batch.batch.id, 12)
    with AppServer(operator_app(ctx)) as srv, httpx.Client(base_url=srv.url) as client:
        old = RevocationFollower(client, tmp_path / "v1.json", fmt="v1", page_limit=3)
        new = RevocationFollower(client, tmp_path / "v2.json", fmt="v2", page_limit=3)
        rev.revoke_device(ctx, admin, devs[0].device_id, "keyCompromise")
        old.catch_up()
        new.catch_up()
        # more revocations after the v2 agent exists; the v1 agent still gets each one
        for d in devs[1:6]:
            rev.revoke_device(ctx, admin, d.device_id, "superseded")
        rev.suspend_device(ctx, admin, devs[6].device_id)
        rev.revoke_batch(ctx, admin, batch.batch.id, "cACompromise")
        assert new.catch_up() > 0
        assert old.catch_up() > 0
        truth = _revoked_serials(ctx)
        for d in devs:
            assert d.serial_hex in truth
            assert old.is_revoked(d.serial_hex)
            assert new.is_revoked(d.serial_hex)
        assert old.last_seq == new.last_seq
        assert {s for s, r in old.state.overrides.items() if r} == truth
        assert old.state.overrides == new.state.overrides
        # state survives a restart (atomic state file)
        again = RevocationFollower(client, tmp_path / "v1.json", fmt="v1")
        assert again.last_seq == old.last_seq
        assert again.is_revoked(devs[3].serial_hex)
        assert again.catch_up() == 0
        # pages are bounded, the format is checked
        r = client.get("/v1/revocations", params={"since": 0, "limit": 2})
        assert r.status_code == 200
        assert len(r.json()["events"]) == 2
        assert r.json()["more"]
        assert client.get("/v1/revocations", params={"format": "v3"}).status_code == 422
        assert client.get("/v1/revocations", params={"since": -1}).status_code == 422


def test_far_behind_agent_falls_back_to_snapshot(
        ctx: ServiceContext, admin: Principal, batch: BatchCreated,
        factory_principal: Principal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    devs = issue_many(ctx, factory_principal, batch.batch.id, 8)
    for d in devs[:5]:
        rev.revoke_device(ctx, admin, d.device_id)
    with ctx.sessions() as s:
        head = feed.head_seq(s)
    monkeypatch.setattr(feed, "MAX_LAG", 3)
    monkeypatch.setattr("fleettrust.revocation.filter.UNIVERSE_MARGIN", dt.timedelta(0))
    with AppServer(operator_app(ctx)) as srv, httpx.Client(base_url=srv.url) as client:
        r = client.get("/v1/revocations", params={"since": 0})
        assert r.json()["snapshot_required"]
        assert r.json()["snapshot"] == feed.SNAPSHOT_PATH
        snap = client.get("/v1/revocations/snapshot")
        assert snap.status_code == 200
        assert snap.headers["etag"] == f'"{head}"'
        assert client.get("/v1/revocations/snapshot",
                          headers={"If-None-Match": f'"{head}"'}).status_code == 304
        assert flt.Snapshot.from_bytes(snap.content).exceptions == frozenset()  # filter used
        f = RevocationFollower(client, tmp_path / "agent.json")
        f.catch_up()
        assert f.last_seq == head
        assert f.state.snapshot is not None
        assert not f.state.overrides
        rev.revoke_device(ctx, admin, devs[5].device_id)
        f.catch_up()
        assert f.last_seq > head
        for i, d in enumerate(devs):
            cert = x509.load_pem_x509_certificate(d.certificate_pem.encode())
            assert f.is_revoked(d.serial_hex, cert.not_valid_before_utc) == (i < 6)


def test_gateway_stream_push_resume_and_peer_refusal(
        ctx: ServiceContext, admin: Principal, batch: BatchCreated,
        factory_principal: Principal, tmp_path: Path) -> None:
    me = enroll(ctx, factory_principal, batch.batch.id, tmp_path / "me", "me")
    peer = enroll(ctx, factory_principal, batch.batch.id, tmp_path / "peer", "peer")
    others = issue_many(ctx, factory_principal, batch.batch.id, 3)
    rev.revoke_device(ctx, admin, others[0].device_id)  # before the agent ever connected
    with RunningGateway(ctx) as gw:
        gw.gw.app.include_router(gateway_router)
        anon = httpx.Client(base_url=gw.url, verify=tls_client(me.root_path), timeout=10)
        r = anon.get("/v1/revocations")
        assert r.status_code == 401
        assert r.json()["code"] == "client_certificate_required"
        client = me.client(gw)
        state = tmp_path / "agent-state.json"
        f = RevocationFollower(client, state, fmt="v1")
        t = threading.Thread(target=f.run, kwargs={"backoff": 0.1}, daemon=True)
        t.start()
        assert wait_until(f.connected.is_set, 10)
        assert f.is_revoked(others[0].serial_hex)  # caught up before streaming
        peer_der = x509.load_pem_x509_certificate(peer.cert_path.read_bytes())
        check_peer_certificate(f, peer_der)  # good peer accepted
        rev.revoke_device(ctx, admin, peer.device_id, "keyCompromise")
        assert wait_until(lambda: f.is_revoked(peer.serial), 3)  # pushed over SSE
        with pytest.raises(PeerRevokedError):
            check_peer_certificate(f, peer_der)

        class _Conn:
            def __init__(self, der: bytes | None) -> None:
                self.der = der

            def getpeercert(self, binary_form: bool = True) -> bytes | None:
                return self.der

        from cryptography.hazmat.primitives.serialization import Encoding

        with pytest.raises(PeerRevokedError):
            check_tls_peer(f, _Conn(peer_der.public_bytes(Encoding.DER)))  # type: ignore[arg-type]
        with pytest.raises(PeerRefusedError):
            check_tls_peer(f, _Conn(None))  # type: ignore[arg-type]
        f.stop()
        t.join(10)
        assert not t.is_alive()
        # offline: revocations happen; the next session resumes with Last-Event-ID
        rev.revoke_device(ctx, admin, others[1].device_id)
        rev.suspend_device(ctx, admin, others[2].device_id)
        g = RevocationFollower(me.client(gw), state, fmt="v2")
        ended: list[str] = []

        def follow() -> None:
            try:
                g.stream()
                ended.append("eof")
            except FeedError as exc:
                ended.append(str(exc))

        t2 = threading.Thread(target=follow, daemon=True)
        t2.start()
        assert wait_until(lambda: g.is_revoked(others[2].serial_hex), 5)
        assert g.is_revoked(others[1].serial_hex)
        assert g.is_revoked(peer.serial)
        # the streaming device itself is revoked: the gateway closes its stream
        rev.revoke_device(ctx, admin, me.device_id)
        t2.join(5)
        assert not t2.is_alive()
        assert ended
        anon.close()
