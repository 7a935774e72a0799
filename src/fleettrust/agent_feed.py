"""Device side of the revocation feed: follow it, remember it, refuse revoked peers.

:class:`RevocationFollower` keeps what the device knows about revocations in one state file
(written atomically: temporary file, fsync, rename):

* ``last_seq`` — the feed position applied so far;
* optionally the compact snapshot (:mod:`fleettrust.revocation.filter`) it started from;
* ``overrides`` — serial -> revoked, from the events after the snapshot (or from the start).

It catches up with ``GET /v1/revocations?since=N`` pages after being offline, falls back to
``GET /v1/revocations/snapshot`` when the server says the device is too far behind, and follows
``GET /v1/revocations/stream`` (server-sent events, resumed with ``Last-Event-ID``) while
connected. :meth:`RevocationFollower.run` does all of it in a loop with back-off.

:func:`check_peer_certificate` / :func:`check_tls_peer` refuse a peer (another device, a local
gateway) whose certificate is revoked or on hold.

The HTTP client is the caller's (the agent's mutual-TLS ``httpx.Client`` pointed at the gateway,
or any client of the operator API); this module opens no connection of its own.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx
from cryptography import x509

from fleettrust.revocation import feed
from fleettrust.revocation.filter import Snapshot, SnapshotFormatError

log = logging.getLogger("fleettrust.agent.feed")

STATE_VERSION: Final = 1
FEED_PATH: Final = "/v1/revocations"
SNAPSHOT_PATH: Final = "/v1/revocations/snapshot"
STREAM_PATH: Final = "/v1/revocations/stream"


class FeedError(Exception):
    """The feed could not be read or understood (transient: retry later)."""


class PeerRefusedError(Exception):
    """A peer must not be trusted."""


class PeerRevokedError(PeerRefusedError):
    """A peer presented a certificate that is revoked or on hold."""

    def __init__(self, serial_hex: str) -> None:
        super().__init__(f"peer certificate {serial_hex} is revoked")
        self.serial_hex = serial_hex


@dataclass
class FeedState:
    last_seq: int = 0
    overrides: dict[str, bool] = field(default_factory=dict)  # serial -> revoked
    snapshot: bytes | None = None
    updated_at: float = 0.0  # unix time of the last successful contact

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "last_seq": self.last_seq,
                "revoked": sorted(s for s, r in self.overrides.items() if r),
                "released": sorted(s for s, r in self.overrides.items() if not r),
                "snapshot": base64.b64encode(self.snapshot).decode() if self.snapshot else None,
                "updated_at": self.updated_at}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> FeedState:
        if doc.get("version") != STATE_VERSION:
            raise ValueError(f"unknown feed state version {doc.get('version')!r}")
        overrides = {str(s): True for s in doc["revoked"]}
        overrides.update({str(s): False for s in doc["released"]})
        snap = doc.get("snapshot")
        return cls(int(doc["last_seq"]), overrides,
                   base64.b64decode(snap) if snap else None, float(doc.get("updated_at", 0)))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


class RevocationFollower:
    """Follows the revocation feed for one device and answers :meth:`is_revoked`.

    Thread-safety: :meth:`is_revoked` may be called from any thread while another thread runs
    :meth:`run` (state is replaced, never mutated in place, under a lock).
    """

    def __init__(self, client: httpx.Client, state_path: Path, *, fmt: str = "v1",
                 page_limit: int = feed.DEFAULT_LIMIT,
                 on_events: Callable[[list[feed.FeedEvent]], None] | None = None) -> None:
        self.client = client
        self.state_path = Path(state_path)
        self.fmt = feed.check_format(fmt)
        self.page_limit = page_limit
        self.on_events = on_events
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._response: httpx.Response | None = None
        self.state = self._load()
        self._snapshot: Snapshot | None = self._parse_snapshot(self.state.snapshot)
        self.bytes_received = 0  # body bytes read from the server (benchmarks)
        self.connected = threading.Event()  # set while an event stream is open

    # --- state -----------------------------------------------------------------------------

    def _load(self) -> FeedState:
        try:
            return FeedState.from_json(json.loads(self.state_path.read_bytes()))
        except FileNotFoundError:
            return FeedState()
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("feed state %s unreadable (%s); starting over", self.state_path, exc)
            return FeedState()

    @staticmethod
    def _parse_snapshot(data: bytes | None) -> Snapshot | None:
        if data is None:
            return None
        try:
            return Snapshot.from_bytes(data)
        except SnapshotFormatError as exc:
            log.warning("stored snapshot unusable (%s)", exc)
            return None

    def _save(self) -> None:
        _atomic_write(self.state_path, json.dumps(self.state.to_json()).encode())

    @property
    def last_seq(self) -> int:
        return self.state.last_seq

    def is_revoked(self, serial_hex: str, not_before: dt.datetime | None = None) -> bool:
        """Revoked or on hold, as far as this device knows. Pass the certificate's
        ``not_before`` when known: the snapshot answers exactly only for certificates issued
        before its cutoff."""
        serial = format(int(serial_hex, 16), "x")
        verdict = self.state.overrides.get(serial)
        if verdict is not None:
            return verdict
        snap = self._snapshot
        return snap is not None and snap.is_revoked(serial, not_before)

    def apply(self, events: Iterable[feed.FeedEvent], *, save: bool = True) -> int:
        """Apply events in order (those at or below ``last_seq`` are skipped: duplicates from
        SSE, MQTT or a retried page are harmless). Returns how many were new."""
        fresh = [e for e in events if e.seq > self.state.last_seq]
        fresh.sort(key=lambda e: e.seq)
        if not fresh:
            return 0
        with self._lock:
            overrides = dict(self.state.overrides)
            for e in fresh:
                overrides[e.serial_hex] = e.action != "release"
            self.state = FeedState(fresh[-1].seq, overrides, self.state.snapshot, time.time())
            if save:
                self._save()
        if self.on_events is not None:
            self.on_events(fresh)
        return len(fresh)

    # --- pull ------------------------------------------------------------------------------

    def _get_json(self, path: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            r = self.client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise FeedError(f"feed request failed: {exc}") from exc
        self.bytes_received += len(r.content)
        if r.status_code != 200:
            raise FeedError(f"feed request got HTTP {r.status_code}: {r.text[:200]}")
        doc: dict[str, Any] = r.json()
        return doc

    def catch_up(self) -> int:
        """Read pages until the position is the server's head; returns events applied."""
        applied = 0
        while True:
            doc = self._get_json(FEED_PATH, {"since": self.state.last_seq, "format": self.fmt,
                                             "limit": self.page_limit})
            if doc.get("snapshot_required"):
                self.load_snapshot()
                continue
            try:
                events = feed.decode(doc)
            except (ValueError, KeyError, TypeError) as exc:
                raise FeedError(f"feed page not understood: {exc}") from exc
            applied += self.apply(events)
            if not events or not doc.get("more"):
                with self._lock:
                    self.state.updated_at = time.time()
                return applied

    def load_snapshot(self) -> None:
        """Replace the state by the server's snapshot (then follow the feed from its seq)."""
        headers = {}
        if self._snapshot is not None:
            headers["If-None-Match"] = f'"{self._snapshot.seq}"'
        try:
            r = self.client.get(SNAPSHOT_PATH, headers=headers)
        except httpx.HTTPError as exc:
            raise FeedError(f"snapshot request failed: {exc}") from exc
        self.bytes_received += len(r.content)
        if r.status_code == 304 and self._snapshot is not None:
            data = self.state.snapshot
        elif r.status_code == 200:
            data = r.content
        else:
            raise FeedError(f"snapshot request got HTTP {r.status_code}")
        assert data is not None
        try:
            snap = Snapshot.from_bytes(data)
        except SnapshotFormatError as exc:
            raise FeedError(str(exc)) from exc
        with self._lock:
            self.state = FeedState(snap.seq, {}, data, time.time())
            self._snapshot = snap
            self._save()
        log.info("revocation snapshot loaded: seq %d, %d bytes", snap.seq, len(data))

    # --- push ------------------------------------------------------------------------------

    def apply_push(self, doc: dict[str, Any]) -> bool:
        """Apply a feed page pushed to the device (an MQTT message of
        ``fleettrust/revocations/v1``). ``False`` if the page does not continue from
        :attr:`last_seq` (the device missed something): call :meth:`catch_up` then."""
        try:
            events = feed.decode(doc)
            since = int(doc["since"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FeedError(f"pushed page not understood: {exc}") from exc
        if since > self.state.last_seq:
            return False
        self.apply(events)
        return True

    def stream(self, *, read_timeout: float = 45.0) -> None:
        """Follow the event stream until it ends, the connection fails or :meth:`stop`."""
        headers = {"Accept": "text/event-stream", "Last-Event-ID": str(self.state.last_seq)}
        timeout = httpx.Timeout(10.0, read=read_timeout)
        try:
            with self.client.stream("GET", STREAM_PATH, params={"format": self.fmt},
                                    headers=headers, timeout=timeout) as r:
                if r.status_code != 200:
                    r.read()
                    raise FeedError(f"stream got HTTP {r.status_code}")
                self._response = r
                self.connected.set()
                for name, data in _sse_events(r.iter_lines()):
                    self.bytes_received += len(data)
                    if self._stop.is_set():
                        return
                    doc = json.loads(data)
                    if name == "snapshot" or doc.get("snapshot_required"):
                        self.load_snapshot()
                        return  # reconnect from the snapshot's seq
                    if name == "revocations":
                        self.apply(feed.decode(doc))
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            if not self._stop.is_set():
                raise FeedError(f"event stream failed: {exc}") from exc
        finally:
            self._response = None
            self.connected.clear()

    def run(self, *, backoff: float = 1.0, max_backoff: float = 60.0) -> None:
        """Catch up, then follow the stream; on any failure wait (with jitter) and start over.
        Returns after :meth:`stop`."""
        delay = backoff
        while not self._stop.is_set():
            try:
                self.catch_up()
                self.stream()
                delay = backoff
            except FeedError as exc:
                log.info("revocation feed: %s; retrying in %.1f s", exc, delay)
                self._stop.wait(delay * (0.5 + random.random()))  # noqa: S311 - jitter only
                delay = min(max_backoff, delay * 2)

    def stop(self) -> None:
        """Make :meth:`run` / :meth:`stream` return (from another thread): the open stream's
        socket is shut down, which wakes a blocked read at once."""
        self._stop.set()
        r = self._response
        if r is not None:
            stream = r.extensions.get("network_stream")
            sock = stream.get_extra_info("socket") if stream is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event name, data) of each server-sent event (comments and ids are skipped)."""
    name, data = "message", list[str]()
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)


# --- peers -------------------------------------------------------------------------------------


def check_peer_certificate(follower: RevocationFollower,
                           certificate: x509.Certificate | bytes) -> None:
    """Raise :class:`PeerRevokedError` if the peer's certificate (object or DER) is revoked or
    on hold (as far as the follower knows)."""
    cert = (certificate if isinstance(certificate, x509.Certificate)
            else x509.load_der_x509_certificate(certificate))
    serial = format(cert.serial_number, "x")
    if follower.is_revoked(serial, cert.not_valid_before_utc):
        raise PeerRevokedError(serial)


def check_tls_peer(follower: RevocationFollower, conn: ssl.SSLSocket | ssl.SSLObject) -> None:
    """Check the certificate a TLS peer presented (after the handshake; the chain itself is
    verified by the SSL context). Closes nothing: the caller drops the connection on error."""
    der = conn.getpeercert(binary_form=True)
    if der is None:
        raise PeerRefusedError("peer presented no certificate")
    check_peer_certificate(follower, der)
