"""Push the revocation feed through an MQTT broker (Mosquitto), for fleets too big for SSE alone.

:class:`RevocationPublisher` follows the ``revocations`` log (``seq > last``, every 50 ms: a
revocation made through any server process is seen) and publishes each batch of new events as one
feed page (the same JSON as ``GET /v1/revocations?format=v1``) to ``fleettrust/revocations/v1``
with QoS 1, then the retained pointer ``fleettrust/revocations/v1/head`` =
``{"seq": N, "snapshot": "/v1/revocations/snapshot", "at": ...}``. Other formats (``v2``) can be
published too, each on its own topic pair.

Exactly one publisher is active per database: each server process may run one, and they elect a
leader with :func:`leader_lock` (a session-level ``pg_try_advisory_lock`` on PostgreSQL, an
``flock`` on a file in the data directory for SQLite, which is single-host anyway). The leader
resumes from the broker's retained head (so a restarted or newly elected leader neither skips nor
floods); if the broker has none (a broker restarted without persistence) from what this process
published last, and a process that never published starts at the database head. Should two
leaders ever overlap (a dropped database connection releases the advisory lock while the old
leader still publishes),
the duplicates are harmless: every event carries its ``seq`` and agents skip those at or below the
position they applied (:meth:`fleettrust.agent_feed.RevocationFollower.apply`). A page whose
``since`` is above an agent's position tells it that it missed something: it catches up with
``GET /v1/revocations?since=N``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import Connection, text

from fleettrust.revocation import feed
from fleettrust.services.context import ServiceContext

log = logging.getLogger("fleettrust.revocation.mqtt")

TOPIC_PREFIX: Final = "fleettrust/revocations"
PUBLISHER_LOCK_KEY: Final = 0x6674_6D71_7474_7075  # "ftmqttpu"
PAGE_EVENTS: Final = 1000  # events per MQTT message (about 170 kB in v1)


def topic(fmt: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{prefix}/{feed.check_format(fmt)}"


def head_topic(fmt: str, prefix: str = TOPIC_PREFIX) -> str:
    return f"{topic(fmt, prefix)}/head"


# --- leader election -----------------------------------------------------------------------------


class LeaderLock(Protocol):
    def try_acquire(self) -> bool: ...

    def still_held(self) -> bool: ...

    def release(self) -> None: ...


class PgAdvisoryLeader:
    """Session-level PostgreSQL advisory lock on a dedicated connection."""

    def __init__(self, ctx: ServiceContext, key: int) -> None:
        self.ctx = ctx
        self.key = key if key < 2**63 else key - 2**64
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        if self._conn is None:
            self._conn = self.ctx.engine.connect()
        got = bool(self._conn.execute(text("SELECT pg_try_advisory_lock(:k)"),
                                      {"k": self.key}).scalar())
        self._conn.commit()
        if not got:
            self._close()
        return got

    def still_held(self) -> bool:
        if self._conn is None:
            return False
        try:
            self._conn.execute(text("SELECT 1"))
            self._conn.commit()
            return True
        except Exception:
            log.warning("leader lock connection lost")
            self._close()
            return False

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
                self._conn.commit()
        self._close()


class FileLeader:
    """``flock`` on a file: one holder per host (SQLite deployments)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def still_held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def leader_lock(ctx: ServiceContext, name: str, key: int) -> LeaderLock:
    """The right leader lock for this database (``key`` for PostgreSQL, ``name`` for files)."""
    if ctx.engine.dialect.name == "postgresql":
        return PgAdvisoryLeader(ctx, key)
    return FileLeader(ctx.settings.data_dir / f"{name}.lock")


# --- the publisher -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: ssl.SSLContext | None = None
    client_id: str = ""
    keepalive: int = 30


def make_client(broker: BrokerSettings, client_id: str) -> mqtt.Client:
    """A paho client for ``broker``; the id is ``client_id``, prefixed by the broker settings'
    ``client_id`` when set (two clients of one process must never share an id: the broker would
    disconnect the first)."""
    cid = f"{broker.client_id}-{client_id}" if broker.client_id else client_id
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=mqtt.MQTTv311)
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.tls is not None:
        client.tls_set_context(broker.tls)
    client.reconnect_delay_set(1, 5)
    return client


class RevocationPublisher:
    """Publishes every new revocation event to the broker (start with :meth:`start`)."""

    def __init__(self, ctx: ServiceContext, broker: BrokerSettings, *,
                 formats: tuple[str, ...] = ("v1",), prefix: str = TOPIC_PREFIX,
                 poll_s: float = 0.05, leader: LeaderLock | None = None) -> None:
        self.ctx = ctx
        self.broker = broker
        self.formats = tuple(feed.check_format(f) for f in formats)
        self.prefix = prefix
        self.poll_s = poll_s
        self.leader = leader or leader_lock(ctx, "mqtt-publisher", PUBLISHER_LOCK_KEY)
        self.published_seq = -1
        self.is_leader = threading.Event()
        self.messages = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> RevocationPublisher:
        self._thread = threading.Thread(target=self._run, name="revocation-mqtt", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> RevocationPublisher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.leader.try_acquire():
                    self._stop.wait(1.0)
                    continue
            except Exception:
                log.exception("leader election failed; retrying")
                self._stop.wait(1.0)
                continue
            self.is_leader.set()
            log.info("revocation MQTT publisher is the leader")
            try:
                self._lead()
            except Exception:
                log.exception("revocation MQTT publisher failed; restarting")
                self._stop.wait(1.0)
            finally:
                self.is_leader.clear()
                self._disconnect()
                with contextlib.suppress(Exception):
                    self.leader.release()

    def _connect(self) -> mqtt.Client:
        client = make_client(self.broker, f"fleettrust-publisher-{os.getpid()}")
        connected = threading.Event()
        client.on_connect = lambda *a: connected.set()
        client.connect_async(self.broker.host, self.broker.port, self.broker.keepalive)
        client.loop_start()
        self._client = client
        if not connected.wait(10):
            raise ConnectionError(f"MQTT broker {self.broker.host}:{self.broker.port} "
                                  "did not accept the connection")
        return client

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_stop()

    def _retained_head(self, client: mqtt.Client) -> int | None:
        got: list[int] = []
        done = threading.Event()
        head = head_topic(self.formats[0], self.prefix)

        def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
            if msg.topic == head:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    got.append(int(json.loads(msg.payload)["seq"]))
                done.set()

        client.on_message = on_message
        client.subscribe(head, qos=1)
        done.wait(1.0)  # a retained message arrives at once; none: the topic is empty
        client.unsubscribe(head)
        client.on_message = None
        return got[0] if got else None

    def _lead(self) -> None:
        client = self._connect()
        with self.ctx.sessions() as s:
            db_head = feed.head_seq(s)
        retained = self._retained_head(client)
        if retained is not None and retained <= db_head:
            last = retained
        elif self.published_seq >= 0:  # broker lost its retained head (restart without
            last = self.published_seq  # persistence): go on from what this process published
        else:
            last = db_head
        if retained is None or retained != last:
            self._publish_head(client, last)
        self.published_seq = last
        while not self._stop.is_set():
            if not self.leader.still_held():
                log.warning("lost the publisher leadership")
                return
            published = self.publish_pending(client)
            if not published:
                self._stop.wait(self.poll_s)

    # --- publishing --------------------------------------------------------------------------

    def _publish(self, client: mqtt.Client, topic_: str, payload: bytes, *,
                 retain: bool = False) -> None:
        info = client.publish(topic_, payload, qos=1, retain=retain)
        info.wait_for_publish(10)
        if not info.is_published():
            raise ConnectionError(f"MQTT publish to {topic_} not acknowledged")
        self.messages += 1

    def _publish_head(self, client: mqtt.Client, seq: int) -> None:
        for fmt in self.formats:
            body = {"seq": seq, "snapshot": feed.SNAPSHOT_PATH, "feed": "/v1/revocations",
                    "at": feed.iso(dt.datetime.now(dt.UTC))}
            self._publish(client, head_topic(fmt, self.prefix), feed.dumps(body), retain=True)

    def publish_pending(self, client: mqtt.Client) -> int:
        """Publish the events after :attr:`published_seq`; returns how many."""
        since = self.published_seq
        with self.ctx.sessions() as s:
            events = feed.events_after(s, since, PAGE_EVENTS)
        if not events:
            return 0
        page = feed.FeedPage(since, events[-1].seq, events[-1].seq, False, False, events)
        t0 = time.perf_counter()
        for fmt in self.formats:
            self._publish(client, topic(fmt, self.prefix), feed.dumps(feed.render(page, fmt)))
        self._publish_head(client, page.next)
        self.published_seq = page.next
        log.debug("published %d revocation events (seq %d..%d) in %.1f ms", len(events),
                  events[0].seq, page.next, (time.perf_counter() - t0) * 1000)
        return len(events)


def start_publisher(ctx: ServiceContext, broker: BrokerSettings, **kw: Any) -> RevocationPublisher:
    """Start a publisher thread in this process (it waits for leadership); ``stop()`` it."""
    return RevocationPublisher(ctx, broker, **kw).start()
