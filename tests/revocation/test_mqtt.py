"""Revocation push over MQTT through a real Mosquitto broker: one leader, resumable, no gaps."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleettrust.agent_feed import RevocationFollower
from fleettrust.config import Settings
from fleettrust.revocation import feed
from fleettrust.revocation.mqtt import BrokerSettings, RevocationPublisher, head_topic, topic
from fleettrust.services import revocation as rev
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import BatchCreated
from tests.revocation.feed_support import (
    AppServer,
    Mosquitto,
    issue_many,
    operator_app,
    wait_until,
)


class Subscriber:
    """An MQTT client subscribed to the v1 feed topic and its retained head."""

    def __init__(self, port: int) -> None:
        self.pages: list[dict[str, Any]] = []
        self.heads: list[int] = []
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="test-sub")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.ready.wait(5)

    def _on_connect(self, client: mqtt.Client, *_a: Any) -> None:
        client.subscribe([(topic("v1"), 1), (head_topic("v1"), 1)])
        self.ready.set()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        doc = json.loads(msg.payload)
        with self.lock:
            if msg.topic == topic("v1"):
                self.pages.append(doc)
            else:
                self.heads.append(int(doc["seq"]))

    def seqs(self) -> list[int]:
        with self.lock:
            return [e.seq for p in self.pages for e in feed.decode(p)]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto.plain(tmp_path / "mqtt") as b:
        yield b


def test_publisher_pushes_each_seq_once_with_two_processes(
        ctx: ServiceContext, settings: Settings, admin: Principal, batch: BatchCreated,
        factory_principal: Principal, broker: Mosquitto, tmp_path: Path) -> None:
    devs = issue_many(ctx, factory_principal, batch.batch.id, 8)
    rev.revoke_device(ctx, admin, devs[0].device_id)  # history before any publisher: not pushed
    sub = Subscriber(broker.port)
    other_ctx = ServiceContext.create(settings)  # a second server process on the same database
    b = BrokerSettings(port=broker.port)
    p1 = RevocationPublisher(ctx, b).start()
    p2 = RevocationPublisher(other_ctx, b)
    try:
        assert wait_until(p1.is_leader.is_set, 5)
        p2.start()
        h0 = db_seqs(ctx, 0)[-1]
        assert wait_until(lambda: sub.heads and sub.heads[-1] == h0, 5)
        rev.revoke_device(ctx, admin, devs[1].device_id)
        rev.revoke_device(other_ctx, admin, devs[2].device_id)  # made through "process B"
        assert wait_until(lambda: sub.seqs() == db_seqs(ctx, h0), 5)
        assert not p2.is_leader.is_set()
        # an agent applies pushes; a page that skips ahead tells it to catch up over HTTP
        with AppServer(operator_app(ctx)) as srv, httpx.Client(base_url=srv.url) as http:
            agent = RevocationFollower(http, tmp_path / "agent.json")
            agent.catch_up()
            assert agent.last_seq == db_seqs(ctx, 0)[-1]
            n = len(sub.pages)
            rev.revoke_batch(ctx, admin, batch.batch.id)  # 5 more device certificates
            assert wait_until(lambda: len(sub.pages) > n, 5)
            assert wait_until(lambda: sub.seqs()[-1:] == db_seqs(ctx, 0)[-1:], 5)
            assert all(agent.apply_push(p) for p in sub.pages[n:])
            assert agent.last_seq == db_seqs(ctx, 0)[-1]
            for d in devs:
                assert agent.is_revoked(d.serial_hex)
            assert not agent.apply_push({"format": "v1", "since": 99, "events": []})
        # leader goes away: the other process takes over from the retained head, no gap/dup
        p1.stop()
        assert wait_until(p2.is_leader.is_set, 5)
        assert wait_until(lambda: p2.published_seq == db_seqs(ctx, 0)[-1], 5)
        more = issue_many(ctx, factory_principal, _new_batch(ctx, factory_principal, batch), 1)
        rev.revoke_device(ctx, admin, more[0].device_id)
        last = db_seqs(ctx, 0)[-1]
        assert wait_until(lambda: sub.seqs() and sub.seqs()[-1] == last, 5)
        assert sub.seqs() == db_seqs(ctx, h0)  # each seq exactly once, in order
        assert wait_until(lambda: sub.heads[-1] == last, 5), sub.heads  # head follows the page
    finally:
        p1.stop()
        p2.stop()
        sub.close()
        other_ctx.close()


def db_seqs(ctx: ServiceContext, after: int) -> list[int]:
    with ctx.sessions() as s:
        return [e.seq for e in feed.events_after(s, after, 10_000)]


def _new_batch(ctx: ServiceContext, principal: Principal, batch: BatchCreated) -> str:
    import datetime as dt

    from fleettrust.services import hierarchy

    return hierarchy.create_batch(
        ctx, principal, batch.batch.factory_id, name="B-2026-12", product_model="TH-100",
        hardware_revision="r2", planned_size=5, manufactured_on=dt.date(2026, 12, 1)).batch.id


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_publisher_survives_broker_restart(
        ctx: ServiceContext, admin: Principal, batch: BatchCreated,
        factory_principal: Principal, broker: Mosquitto) -> None:
    devs = issue_many(ctx, factory_principal, batch.batch.id, 2)
    with RevocationPublisher(ctx, BrokerSettings(port=broker.port), formats=("v1", "v2")) as p:
        assert wait_until(lambda: p.published_seq == 0, 5)
        assert p.is_leader.is_set()
        broker.stop()
        rev.revoke_device(ctx, admin, devs[0].device_id)
        broker.start()  # no persistence: the retained head is gone, the publisher goes on
        sub = Subscriber(broker.port)
        try:
            rev.revoke_device(ctx, admin, devs[1].device_id)
            last = db_seqs(ctx, 0)[-1]
            assert wait_until(lambda: last in sub.seqs(), 10)
            assert p.published_seq == last
        finally:
            sub.close()
