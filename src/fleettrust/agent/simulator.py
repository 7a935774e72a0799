"""Fleet simulator: many virtual devices, real keys and certificates, against a LOOPBACK gateway.

:func:`run_simulation` (what ``fleettrust simulate`` and the benchmarks call):

1. **Devices** — reuses the valid device directories under ``state_root`` (``dev-00000`` …,
   the same state format as the real agent, written with ``durable=False``: atomic but not
   fsynced, they are disposable) and enrolls the missing ones through the factory credential:
   real P-256 keys, real CSRs, synthetic but unique manifests, ``POST
   /v1/batches/{id}/devices/bulk`` in chunks (``enroll_chunk``), certificates checked against
   the returned chain and root before they are stored. :func:`enroll_devices` does only this
   (benchmarks register many devices and check in with fewer).
2. **Preparation** — one TLS client context per device (its own certificate; the fleet root as
   the only anchor), built before the clock starts (~2-3 ms each: OpenSSL 3's PEM key decoding).
3. **Check-ins** — ``concurrency`` asyncio workers (device ``i`` belongs to worker
   ``i % concurrency``, each worker cycles through its devices) post signed check-ins until
   ``duration_s`` has passed or ``max_checkins`` attempts were made. ``warmup`` first makes one
   uncounted check-in per device (so kept-alive connections are open before the clock starts).
   Modes:

   * ``keepalive`` — one long-lived connection per device (closed and re-opened after
     ``checkins_per_connection`` check-ins when set; re-opened when the gateway closed it while
     idle): the kept-alive check-in rate;
   * ``handshake`` — a new connection, with a FULL mTLS handshake, for every check-in;
   * ``resume`` — a new connection per check-in that offers the device's previous TLS session
     (see :mod:`fleettrust.agent.tls`); the report gives the share actually resumed.

   The HTTP client (``client``): ``lean`` (default) writes each request as one buffer on an
   asyncio TLS stream and parses the HTTP/1.1 answer itself — about 20x less CPU per request
   than ``httpx`` (0.06 vs 1.1 ms measured), which matters because the load generator shares
   the machine's CPUs with the gateway it measures; ``httpx`` uses ``httpx.AsyncClient`` per
   device. Both build the same request body (manifest signature made once per device; only
   ``uptime_s`` changes) and parse answers with :mod:`fleettrust.agent.protocol`.
   ``processes`` > 1 spreads the devices (and the concurrency) over that many spawned
   processes, each with its own event loop, started together; their reports are merged.

   Transient failures back off per device (full jitter, 50 ms .. 2 s); a ``renew: true`` answer
   is honoured with a real renewal (new key, CSR, old-key proof, atomic switch).
4. **Report** — check-ins/s, latency p50/p90/p99 (ms, from request start to full response,
   connection set-up included), errors by code, connections (= handshakes) and resumptions,
   the simulator's own CPU time per check-in; ``on_progress`` receives a
   :class:`SimulationSnapshot` every ``progress_interval_s`` for a live display.

Safety bounds: both URLs must point at the loopback interface (:func:`ensure_loopback_url`),
``devices`` ≤ 100 000, ``duration_s`` ≤ 3600, ``concurrency`` ≤ 4096, ``processes`` ≤ 64. The
simulator reports ``agent_generation`` as read at start (it does not persist every check-in,
unlike the agent).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import ipaddress
import json
import math
import random
import secrets
import shutil
import socket
import ssl
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives import serialization

from fleettrust.agent.backoff import BackoffPolicy
from fleettrust.agent.identity import FileDeviceKey, build_csr, public_key_matches, sign_manifest
from fleettrust.agent.protocol import (
    CHECKIN_PATH,
    RENEW_PATH,
    GatewayError,
    build_checkin_body,
    build_renew_request,
    classify_exception,
    classify_response,
    parse_checkin_response,
    parse_issued_identity,
    parse_renew_response,
)
from fleettrust.agent.state import (
    Identity,
    KeyRef,
    RenewalInfo,
    StateError,
    StateStore,
    format_time,
    new_state,
)
from fleettrust.agent.tls import SessionSlot, client_ssl_context, enable_session_resumption
from fleettrust.errors import FleetTrustError
from fleettrust.pki.manifest import Manifest, normalize_manifest

__all__ = [
    "CLIENTS",
    "MAX_CONCURRENCY",
    "MAX_DEVICES",
    "MAX_DURATION_S",
    "SimulationConfig",
    "SimulationError",
    "SimulationReport",
    "SimulationSnapshot",
    "check_device_key",
    "count_enrolled",
    "enroll_devices",
    "ensure_loopback_url",
    "percentile",
    "report_json",
    "run_simulation",
]

MAX_DEVICES: Final = 100_000
MAX_DURATION_S: Final = 3600.0
MAX_CONCURRENCY: Final = 4096
DEVICE_DIR_PREFIX: Final = "dev-"
SIM_STATION: Final = "fleettrust-simulator"

MAX_PROCESSES: Final = 64

Mode = Literal["keepalive", "handshake", "resume"]
MODES: Final = ("keepalive", "handshake", "resume")
Client = Literal["lean", "httpx"]
CLIENTS: Final = ("lean", "httpx")


class SimulationError(FleetTrustError):
    """The simulation cannot run as configured (codes: ``not_loopback``, ``bad_config``,
    ``enrollment_failed``, ``not_enough_devices``)."""

    status = 400
    code = "simulation_error"


# --- configuration and results ------------------------------------------------------------------


@dataclass(frozen=True)
class SimulationConfig:
    """What to simulate. ``server``/``token``/``batch_id`` are needed only to enroll devices
    that ``state_root`` does not already hold."""

    devices: int
    gateway: str
    duration_s: float
    server: str | None = None
    token: str | None = None
    batch_id: str | None = None
    concurrency: int = 32
    state_root: Path | None = None  # None: a temporary directory, removed afterwards
    mode: Mode = "keepalive"
    max_checkins: int | None = None
    checkins_per_connection: int | None = None  # keepalive only; None: never rotate
    enroll_chunk: int = 500
    timeout_s: float = 10.0
    firmware_version: str = "fleettrust-sim-1.0"
    renew: bool = True
    progress_interval_s: float = 0.5
    seed: int | None = None
    processes: int = 1  # check-in processes (each its own event loop); concurrency is split
    warmup: bool = False  # one uncounted check-in per device (connections opened) first
    client: Client = "lean"  # lean: asyncio TLS streams; httpx: httpx.AsyncClient per device

    def validate(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise SimulationError(f"devices must be 1..{MAX_DEVICES}", code="bad_config")
        if not (0 < self.duration_s <= MAX_DURATION_S) or not math.isfinite(self.duration_s):
            raise SimulationError(f"duration must be in (0, {MAX_DURATION_S:g}] s",
                                  code="bad_config")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise SimulationError(f"concurrency must be 1..{MAX_CONCURRENCY}", code="bad_config")
        if self.mode not in MODES:
            raise SimulationError(f"mode must be one of {', '.join(MODES)}", code="bad_config")
        if self.max_checkins is not None and self.max_checkins < 1:
            raise SimulationError("max_checkins must be >= 1", code="bad_config")
        if self.checkins_per_connection is not None and self.checkins_per_connection < 1:
            raise SimulationError("checkins_per_connection must be >= 1", code="bad_config")
        if not 1 <= self.processes <= MAX_PROCESSES:
            raise SimulationError(f"processes must be 1..{MAX_PROCESSES}", code="bad_config")
        if self.client not in CLIENTS:
            raise SimulationError(f"client must be one of {', '.join(CLIENTS)}",
                                  code="bad_config")
        if not 1 <= self.enroll_chunk <= 10_000:
            raise SimulationError("enroll_chunk must be 1..10000", code="bad_config")
        ensure_loopback_url(self.gateway, "gateway", schemes=("https",))
        if self.server is not None:
            ensure_loopback_url(self.server, "server", schemes=("http", "https"))


@dataclass(frozen=True)
class SimulationSnapshot:
    """Live progress (passed to ``on_progress``)."""

    phase: Literal["enrolling", "preparing", "running", "done"]
    elapsed_s: float
    devices_ready: int
    devices_total: int
    checkins_ok: int
    checkins_failed: int
    rate_per_s: float  # over the last interval
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    connections: int
    resumed: int
    renewals: int
    errors: dict[str, int]


@dataclass
class SimulationReport:
    """The final result (``to_json()`` is what ``--json-out`` writes)."""

    mode: Mode
    gateway: str
    devices: int
    devices_enrolled: int
    devices_reused: int
    concurrency: int
    duration_s: float
    elapsed_s: float
    enroll_s: float
    prepare_s: float
    checkins_ok: int
    checkins_failed: int
    checkins_per_s: float
    latency_ms: dict[str, float | None]
    errors: dict[str, int]
    connections: int
    resumed_connections: int
    handshakes_per_s: float
    resumption_rate: float | None
    renewals: int
    state_root: str | None
    started_at: str
    stopped_by: Literal["duration", "max_checkins"]
    processes: int = 1
    client: Client = "lean"
    cpu_s: float | None = None  # CPU time of the simulator's check-in phase (all processes)
    cpu_ms_per_checkin: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of an ascending sequence; None if empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# --- loopback guard -------------------------------------------------------------------------------


def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if host.lower().rstrip(".") != "localhost":
        return False
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def ensure_loopback_url(url: str, what: str, *, schemes: Sequence[str] = ("http", "https")
                        ) -> None:
    """SimulationError ``not_loopback`` unless ``url`` targets 127.0.0.0/8, ::1 or localhost."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
        _ = parts.port  # raises ValueError for a bad port
    except ValueError as exc:
        raise SimulationError(f"{what} URL {url!r} is invalid: {exc}", code="bad_config") from None
    if parts.scheme not in schemes:
        raise SimulationError(f"{what} URL {url!r} must use {' or '.join(schemes)}",
                              code="bad_config")
    if not host or not _is_loopback_host(host):
        raise SimulationError(
            f"{what} URL {url!r} is not on the loopback interface: the simulator only runs "
            "against 127.0.0.0/8, ::1 or localhost", code="not_loopback")


# --- virtual devices ------------------------------------------------------------------------------


def _synthetic_manifest(rng: random.Random) -> dict[str, Any]:
    serial = f"SIM{rng.getrandbits(64):016X}"
    mac = bytearray(rng.getrandbits(8) for _ in range(6))
    mac[0] = (mac[0] & 0xFC) | 0x02  # locally administered, unicast
    return {"cpu_serial": serial, "mac_addresses": [mac.hex(":")],
            "wlan_module_id": f"SIMWLAN-{serial[3:]}"}


@dataclass
class _Device:
    index: int
    store: StateStore
    identity: Identity
    manifest: Manifest
    signature: str
    context: ssl.SSLContext | None = None
    slot: SessionSlot | None = None
    client: httpx.AsyncClient | None = None
    conn: _LeanConnection | None = None
    body_prefix: bytes | None = None
    on_connection: int = 0
    failures: int = 0
    started: float = field(default_factory=time.monotonic)


def _device_dirs(root: Path) -> list[Path]:
    if not root.exists():
        return []
    return sorted(p for p in root.iterdir()
                  if p.is_dir() and p.name.startswith(DEVICE_DIR_PREFIX))


def _load_existing(root: Path, wanted: int) -> list[Identity]:
    found: list[Identity] = []
    for directory in _device_dirs(root):
        if len(found) >= wanted:
            break
        store = StateStore(directory, durable=False)
        try:
            identity = store.load(verify_chain_to_root=False)
        except (StateError, FleetTrustError):
            continue
        if identity.state.phase == "enrolled" and isinstance(identity.key, FileDeviceKey):
            found.append(identity)
    return found


def _enroll_missing(
    config: SimulationConfig,
    root: Path,
    count: int,
    rng: random.Random,
    progress: Callable[[int], None],
) -> list[Identity]:
    if count <= 0:
        return []
    if not (config.server and config.token and config.batch_id):
        raise SimulationError(
            f"{count} more device(s) must be enrolled: pass --server, --token and --batch",
            code="not_enough_devices")
    used = {p.name for p in _device_dirs(root)}
    next_index = 0
    enrolled: list[Identity] = []
    url = f"{config.server.rstrip('/')}/v1/batches/{config.batch_id}/devices/bulk"
    headers = {"Authorization": f"Bearer {config.token}", "User-Agent": "fleettrust-simulator"}
    with httpx.Client(timeout=max(config.timeout_s, 300.0), trust_env=False) as client:
        while len(enrolled) < count:
            size = min(config.enroll_chunk, count - len(enrolled))
            keys = [FileDeviceKey.generate() for _ in range(size)]
            manifests = [normalize_manifest(_synthetic_manifest(rng)) for _ in range(size)]
            items = [{"csr": build_csr(k).public_bytes(serialization.Encoding.PEM).decode(),
                      "manifest": m.to_dict(), "station": SIM_STATION}
                     for k, m in zip(keys, manifests, strict=True)]
            try:
                response = client.post(url, json={"items": items}, headers=headers)
            except httpx.HTTPError as exc:
                raise SimulationError(f"cannot reach the operator API at {config.server}: {exc}",
                                      code="enrollment_failed") from exc
            if response.status_code != 201:
                error = classify_response(response, "bulk enrollment")
                raise SimulationError(error.message, code="enrollment_failed")
            doc = response.json()
            issued = doc.get("devices") if isinstance(doc, dict) else None
            if not isinstance(issued, list) or len(issued) != size:
                raise SimulationError("bulk enrollment answered with the wrong device count",
                                      code="enrollment_failed")
            now = dt.datetime.now(dt.UTC)
            for key, manifest, entry in zip(keys, manifests, issued, strict=True):
                try:
                    cert = parse_issued_identity(
                        doc, certificate_pem=entry.get("certificate_pem"),
                        device_id=entry.get("device_id"), new_public_key=key.public_key(),
                        pinned_root=None, expected_device_id=None, now=now)
                except GatewayError as exc:
                    raise SimulationError(f"issued certificate rejected: {exc.message}",
                                          code="enrollment_failed") from exc
                while f"{DEVICE_DIR_PREFIX}{next_index:05d}" in used:
                    next_index += 1
                name = f"{DEVICE_DIR_PREFIX}{next_index:05d}"
                used.add(name)
                store = StateStore(root / name, durable=False)
                store.ensure_directory()
                key_name = store.write_key(key)
                state = store.create(new_state(key=KeyRef(kind="file", file=key_name),
                                               manifest=manifest.to_dict(), now=now,
                                               gateway_url=config.gateway,
                                               operator_url=config.server))
                store.install_identity(state, key=key, key_ref=state.key,
                                       device_id=cert.device_id, certificate=cert.certificate,
                                       chain=cert.chain, root=cert.root, now=now)
                enrolled.append(store.load(verify_chain_to_root=False))
            progress(len(enrolled))
    return enrolled


def _prepare(identity: Identity, config: SimulationConfig, index: int) -> _Device:
    store = StateStore(identity.directory, durable=False)
    state = store.save(identity.state.evolve(boot_counter=identity.state.boot_counter + 1,
                                             gateway_url=config.gateway))
    identity = Identity(state=state, directory=identity.directory, key=identity.key,
                        certificate=identity.certificate, chain=identity.chain,
                        root=identity.root)
    manifest = normalize_manifest(state.manifest)
    device = _Device(index=index, store=store, identity=identity, manifest=manifest,
                     signature=sign_manifest(identity.key, manifest))
    _make_context(device, config)
    return device


def _make_context(device: _Device, config: SimulationConfig) -> None:
    identity = device.identity
    context = client_ssl_context(root=identity.root_path, certificate=identity.certificate_path,
                                 key=identity.key_path)
    device.context = context
    device.slot = enable_session_resumption(context, resume=config.mode == "resume")


# --- the check-in phase ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Answer:
    """An HTTP answer read by :class:`_LeanConnection` (what the protocol parsers read)."""

    status_code: int
    headers: dict[str, str]
    content: bytes


class _LeanProtocolError(EOFError):
    """The gateway's answer is not well-formed HTTP/1.1 (or the connection ended early)."""


class _LeanConnection:
    """One HTTP/1.1 connection over asyncio's TLS streams: the simulator's default client.

    It writes each request as ONE buffer (headers and body together, so one TLS record) and
    parses answers with ``Content-Length`` or chunked bodies. About 20x cheaper per request in
    CPU than ``httpx.AsyncClient`` (measured: 0.06 vs 1.1 ms on these machines), which matters
    when the load generator shares the CPUs with the gateway it measures. Devices use the
    agent's synchronous httpx client; ``SimulationConfig.client="httpx"`` keeps that path too.
    """

    __slots__ = ("reader", "writer")

    MAX_ANSWER: Final = 1 << 20

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, context: ssl.SSLContext) -> _LeanConnection:
        reader, writer = await asyncio.open_connection(host, port, ssl=context,
                                                       server_hostname=host)
        return cls(reader, writer)

    def ssl_object(self) -> ssl.SSLObject | None:
        obj: ssl.SSLObject | None = self.writer.get_extra_info("ssl_object")
        return obj

    async def request(self, head: bytes, body: bytes) -> tuple[_Answer, bool]:
        """Send one request; return the answer and whether the connection stays usable."""
        self.writer.write(head + body)
        reader = self.reader
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise _LeanProtocolError("connection closed before an answer") from exc
        except asyncio.LimitOverrunError as exc:
            raise _LeanProtocolError("answer headers too long") from exc
        lines = raw[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise _LeanProtocolError(f"bad status line {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise _LeanProtocolError("bad header line")
            headers[name.strip().lower()] = value.strip()
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        try:
            if headers.get("transfer-encoding", "").lower() == "chunked":
                content = await self._chunked()
            elif "content-length" in headers:
                length = int(headers["content-length"])
                if not 0 <= length <= self.MAX_ANSWER:
                    raise _LeanProtocolError(f"content-length {length} out of range")
                content = await reader.readexactly(length)
            else:
                content = await reader.read(self.MAX_ANSWER)
                keep = False
        except asyncio.IncompleteReadError as exc:
            raise _LeanProtocolError("connection closed in the middle of an answer") from exc
        except ValueError as exc:
            raise _LeanProtocolError(f"bad answer framing: {exc}") from exc
        return _Answer(int(code), headers, content), keep

    async def _chunked(self) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            total += size
            if total > self.MAX_ANSWER:
                raise _LeanProtocolError("chunked answer too long")
            if size == 0:
                while (await self.reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        """Start closing (TLS close_notify); :meth:`finish_close` waits for the peer."""
        self.writer.close()

    async def finish_close(self, grace: float = 2.0) -> None:
        """Wait up to ``grace`` seconds for the TLS shutdown, then drop the connection."""
        try:
            async with asyncio.timeout(grace):
                await self.writer.wait_closed()
        except (TimeoutError, OSError, ssl.SSLError, EOFError):
            self.writer.transport.abort()


class _Run:
    """Shared counters of one check-in phase (single event loop: no locks needed)."""

    def __init__(self, config: SimulationConfig, devices: list[_Device], seed: int,
                 max_checkins: int | None = None) -> None:
        self.config = config
        self.devices = devices
        self.rng = random.Random(seed)  # noqa: S311  # back-off jitter, not cryptography
        self.stop = asyncio.Event()
        self.attempts = 0
        self.max_checkins = config.max_checkins if max_checkins is None else max_checkins
        self.ok = 0
        self.failed = 0
        self.renewals = 0
        self.resumed = 0
        self.errors: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.window: list[float] = []
        self.stopped_by: Literal["duration", "max_checkins"] = "duration"
        self.backoff = BackoffPolicy(base_s=0.05, cap_s=2.0)
        self.keepalive = config.mode == "keepalive"
        self.resume = config.mode == "resume"
        parts = urlsplit(config.gateway)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 443
        host_header = parts.netloc.encode("ascii")
        self.extra = (b"connection: keep-alive\r\n" if self.keepalive
                      else b"connection: close\r\n")
        self.head_prefix = (b"host: " + host_header + b"\r\nuser-agent: fleettrust-simulator"
                            b"\r\ncontent-type: application/json\r\n" + self.extra)
        self.closing: set[asyncio.Future[None]] = set()
        self.baseline_connections = 0

    def connections(self) -> int:
        total = sum(d.slot.connections for d in self.devices if d.slot is not None)
        return total - self.baseline_connections

    async def warm_up(self, groups: list[list[_Device]]) -> None:
        """One check-in per device, not counted (kept-alive connections are opened)."""

        async def visit(group: list[_Device]) -> None:
            for device in group:
                await self.checkin(device)

        await asyncio.gather(*(visit(group) for group in groups))
        self.baseline_connections += self.connections()
        self.ok = self.failed = self.renewals = self.resumed = 0
        self.errors.clear()
        self.latencies = []
        self.window = []

    def take_ticket(self) -> bool:
        if self.stop.is_set():
            return False
        limit = self.max_checkins
        if limit is not None and self.attempts >= limit:
            self.stopped_by = "max_checkins"
            self.stop.set()
            return False
        self.attempts += 1
        return True

    # -- transports

    def client_for(self, device: _Device) -> httpx.AsyncClient:
        if device.client is None:
            if device.context is None:
                _make_context(device, self.config)
            assert device.context is not None
            limits = (httpx.Limits(max_connections=1, max_keepalive_connections=1,
                                   keepalive_expiry=3600.0) if self.keepalive
                      else httpx.Limits(max_connections=1, max_keepalive_connections=0))
            headers = {"User-Agent": "fleettrust-simulator"}
            if not self.keepalive:
                headers["Connection"] = "close"
            device.client = httpx.AsyncClient(
                base_url=self.config.gateway, verify=device.context, trust_env=False,
                timeout=httpx.Timeout(self.config.timeout_s), limits=limits, headers=headers)
        return device.client

    async def close_client(self, device: _Device) -> None:
        client, device.client = device.client, None
        if client is not None:
            await client.aclose()
        self._drop_lean(device)

    def _drop_lean(self, device: _Device) -> None:
        conn, device.conn = device.conn, None
        if conn is not None:
            conn.close()
            task = asyncio.ensure_future(conn.finish_close())
            self.closing.add(task)
            task.add_done_callback(self.closing.discard)

    async def _post_lean(self, device: _Device, path: str, body: bytes, what: str
                         ) -> _Answer:
        fresh = False
        conn = device.conn
        if conn is not None and conn.reader.at_eof():  # the server closed it while idle
            self._drop_lean(device)
            conn = None
        if conn is None:
            if device.context is None:
                _make_context(device, self.config)
            assert device.context is not None
            try:
                conn = await _LeanConnection.open(self.host, self.port, device.context)
            except Exception as exc:
                error = classify_exception(exc, what, connecting=True)
                if error is None:
                    raise
                raise error from exc
            device.conn = conn
            fresh = True
        head = (b"POST " + path.encode("ascii") + b" HTTP/1.1\r\n" + self.head_prefix
                + b"content-length: " + str(len(body)).encode("ascii") + b"\r\n\r\n")
        try:
            answer, keep = await conn.request(head, body)
        except BaseException:
            self._drop_lean(device)
            raise
        if fresh:
            self._note_connection(device)
        if not (keep and self.keepalive):  # we asked for "connection: close" otherwise
            self._drop_lean(device)
        return answer

    def _note_connection(self, device: _Device) -> None:
        """After an answer: count a resumed connection once, keep its session (resume)."""
        slot = device.slot
        if slot is not None:
            before = slot.resumed
            slot.capture()
            self.resumed += slot.resumed - before

    async def _post(self, device: _Device, path: str, body: bytes, what: str
                    ) -> _Answer | httpx.Response:
        """POST ``body``; the answer (any status) or GatewayError for a transport failure."""
        try:
            async with asyncio.timeout(self.config.timeout_s):
                if self.config.client == "lean":
                    return await self._post_lean(device, path, body, what)
                response = await self.client_for(device).post(
                    path, content=body, headers={"content-type": "application/json"})
                self._note_connection(device)
                return response
        except GatewayError:
            raise
        except Exception as exc:
            error = classify_exception(exc, what)
            if error is None:
                raise
            raise error from exc

    # -- one check-in

    def _record_error(self, error: GatewayError) -> None:
        self.failed += 1
        key = f"{error.http_status} {error.code}" if error.http_status else error.code
        self.errors[key] += 1

    def _body(self, device: _Device) -> bytes:
        if device.body_prefix is None:
            state = device.identity.state
            doc = build_checkin_body(
                key=device.identity.key, manifest=device.manifest,
                firmware_version=self.config.firmware_version, boot_counter=state.boot_counter,
                uptime_s=0, agent_generation=state.generation,
                health={"status": "ok", "metrics": {"sim_index": float(device.index)}},
                manifest_signature=device.signature)
            del doc["uptime_s"]
            device.body_prefix = json.dumps(doc, separators=(",", ":")).encode()[:-1]
        uptime = int(time.monotonic() - device.started)
        return device.body_prefix + b',"uptime_s":' + str(uptime).encode("ascii") + b"}"

    async def checkin(self, device: _Device) -> None:
        body = self._body(device)
        started = time.perf_counter()
        error: GatewayError | None = None
        renew = False
        try:
            response = await self._post(device, CHECKIN_PATH, body, "check-in")
            if response.status_code == 200:
                renew = parse_checkin_response(response).renew
            else:
                error = classify_response(response, "check-in")
        except GatewayError as exc:
            error = exc
        elapsed = time.perf_counter() - started
        if error is None:
            self.ok += 1
            self.latencies.append(elapsed)
            self.window.append(elapsed)
            device.failures = 0
        else:
            self._record_error(error)
            if error.kind == "transient":
                delay = self.backoff.delay(device.failures, self.rng)
                device.failures += 1
                await self.close_client(device)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=delay)
        if self.keepalive and self.config.checkins_per_connection is not None:
            device.on_connection += 1
            if device.on_connection >= self.config.checkins_per_connection:
                device.on_connection = 0
                await self.close_client(device)
        if renew and self.config.renew and not self.stop.is_set():
            await self.renew(device)

    async def renew(self, device: _Device) -> None:
        identity = device.identity
        state = identity.state
        assert state.device_id is not None
        assert identity.root is not None
        new_key = FileDeviceKey.generate()
        body, _ = build_renew_request(identity.key, new_key, state.device_id)
        now = dt.datetime.now(dt.UTC)
        try:
            response = await self._post(device, RENEW_PATH, json.dumps(body).encode(),
                                        "renewal")
            if response.status_code != 200:
                raise classify_response(response, "renewal")
            renewed = parse_renew_response(response, new_key=new_key,
                                           pinned_root=identity.root,
                                           device_id=state.device_id, now=now)
        except GatewayError as exc:
            self._record_error(exc)
            return
        renewal = RenewalInfo(count=state.renewal.count + 1, last_renewed_at=format_time(now),
                              last_attempt_at=format_time(now),
                              previous_serial=state.certificate_serial)
        device.store.install_identity(state, key=new_key, key_ref=None,
                                      device_id=renewed.device_id,
                                      certificate=renewed.certificate, chain=renewed.chain,
                                      root=renewed.root, now=now, renewal=renewal)
        device.identity = device.store.load(verify_chain_to_root=False)
        await self.close_client(device)
        _make_context(device, self.config)
        device.signature = sign_manifest(device.identity.key, device.manifest)
        device.body_prefix = None
        self.renewals += 1

    async def worker(self, devices: list[_Device]) -> None:
        position = 0
        while self.take_ticket():
            device = devices[position % len(devices)]
            position += 1
            await self.checkin(device)

    def snapshot(self, phase: Literal["running", "done"], elapsed: float,
                 interval: float) -> SimulationSnapshot:
        window = sorted(self.window)
        self.window = []
        p50, p90, p99 = (percentile(window, q) for q in (50, 90, 99))
        return SimulationSnapshot(
            phase=phase, elapsed_s=elapsed, devices_ready=len(self.devices),
            devices_total=len(self.devices), checkins_ok=self.ok, checkins_failed=self.failed,
            rate_per_s=len(window) / interval if interval > 0 else 0.0,
            p50_ms=None if p50 is None else p50 * 1000, p90_ms=None if p90 is None else p90 * 1000,
            p99_ms=None if p99 is None else p99 * 1000, connections=self.connections(),
            resumed=self.resumed, renewals=self.renewals, errors=dict(self.errors))


async def _run_checkins(
    config: SimulationConfig,
    devices: list[_Device],
    on_progress: Callable[[SimulationSnapshot], None] | None,
    seed: int,
    max_checkins: int | None = None,
    before_start: Callable[[], Awaitable[None]] | None = None,
) -> tuple[_Run, float]:
    run = _Run(config, devices, seed, max_checkins)
    workers = min(config.concurrency, len(devices))
    groups = [devices[w::workers] for w in range(workers)]
    if config.warmup:
        await run.warm_up(groups)
    if before_start is not None:
        await before_start()
    started = time.perf_counter()

    async def timer() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.stop.wait(), timeout=config.duration_s)
        run.stop.set()

    async def reporter() -> None:
        last = time.perf_counter()
        while not run.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.stop.wait(), timeout=config.progress_interval_s)
            now = time.perf_counter()
            if on_progress is not None and not run.stop.is_set():
                on_progress(run.snapshot("running", now - started, now - last))
            last = now

    timer_task = asyncio.create_task(timer())
    reporter_task = asyncio.create_task(reporter())
    try:
        await asyncio.gather(*(run.worker(group) for group in groups))
    finally:
        run.stop.set()
        await asyncio.gather(timer_task, reporter_task, return_exceptions=True)
        elapsed = time.perf_counter() - started
        for device in devices:
            await run.close_client(device)
        if run.closing:
            await asyncio.gather(*run.closing, return_exceptions=True)
    return run, elapsed


# --- several processes ----------------------------------------------------------------------------


@dataclass
class _Partial:
    """What one check-in process reports back (picklable)."""

    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    connections: int = 0
    resumed: int = 0
    renewals: int = 0
    elapsed_s: float = 0.0
    cpu_s: float = 0.0
    prepare_s: float = 0.0
    stopped_by: Literal["duration", "max_checkins"] = "duration"


def _partial(run: _Run, elapsed: float, cpu_s: float, prepare_s: float) -> _Partial:
    return _Partial(ok=run.ok, failed=run.failed, errors=dict(run.errors),
                    latencies=run.latencies, connections=run.connections(),
                    resumed=run.resumed, renewals=run.renewals, elapsed_s=elapsed,
                    cpu_s=cpu_s, prepare_s=prepare_s, stopped_by=run.stopped_by)


def _process_main(config: SimulationConfig, directories: list[str], first_index: int,
                  seed: int, max_checkins: int | None, messages: Any, go: Any) -> None:
    """One check-in process: prepare its devices, wait for ``go``, run, report."""
    try:
        clock = time.perf_counter()
        devices = []
        for offset, directory in enumerate(directories):
            identity = StateStore(Path(directory), durable=False).load(
                verify_chain_to_root=False)
            devices.append(_prepare(identity, config, first_index + offset))
        prepare_s = time.perf_counter() - clock
        cpu = 0.0

        async def ready_then_go() -> None:
            nonlocal cpu
            messages.put(("ready", first_index, None))
            if not await asyncio.get_running_loop().run_in_executor(None, go.wait, 600.0):
                raise TimeoutError("no start signal from the parent process")
            cpu = time.process_time()

        def progress(snap: SimulationSnapshot) -> None:
            messages.put(("progress", first_index, snap))

        run, elapsed = asyncio.run(_run_checkins(config, devices, progress, seed, max_checkins,
                                                 ready_then_go))
        messages.put(("done", first_index,
                      _partial(run, elapsed, time.process_time() - cpu, prepare_s)))
    except BaseException as exc:  # report, never hang the parent
        messages.put(("failed", first_index, f"{type(exc).__name__}: {exc}"))
        raise


def _run_processes(
    config: SimulationConfig,
    identities: list[Identity],
    seed: int,
    on_progress: Callable[[SimulationSnapshot], None] | None,
) -> tuple[_Partial, float, float]:
    """Spread the devices over ``config.processes`` processes (spawned: each has its own
    interpreter and event loop), start them together, merge their reports."""
    import multiprocessing

    n = min(config.processes, len(identities))
    mp = multiprocessing.get_context("spawn")
    messages = mp.Queue()
    go = mp.Event()
    shares = [identities[i::n] for i in range(n)]
    limits: list[int | None] = [None] * n
    if config.max_checkins is not None:
        limits = [config.max_checkins // n + (1 if i < config.max_checkins % n else 0)
                  for i in range(n)]
    procs = []
    clock = time.perf_counter()
    for i, share in enumerate(shares):
        proc = mp.Process(
            target=_process_main, name=f"fleettrust-sim-{i}", daemon=True,
            args=(config, [str(d.directory) for d in share], i * 1_000_000, seed + i, limits[i],
                  messages, go))
        proc.start()
        procs.append(proc)
    try:
        ready = 0
        while ready < n:
            kind, _, payload = messages.get(timeout=600)
            if kind == "failed":
                raise SimulationError(f"a simulator process failed: {payload}",
                                      code="process_failed")
            if kind == "ready":
                ready += 1
        prepare_s = time.perf_counter() - clock
        go.set()
        started = time.perf_counter()
        done: list[_Partial] = []
        latest: dict[int, SimulationSnapshot] = {}
        while len(done) < n:
            kind, index, payload = messages.get(timeout=config.duration_s + 600)
            if kind == "failed":
                raise SimulationError(f"a simulator process failed: {payload}",
                                      code="process_failed")
            if kind == "done":
                done.append(payload)
            elif kind == "progress" and on_progress is not None:
                latest[index] = payload
                if len(latest) == n:
                    on_progress(_merge_snapshots(list(latest.values()),
                                                 time.perf_counter() - started))
                    latest.clear()
    finally:
        go.set()
        for proc in procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
                proc.join()
    merged = _Partial(stopped_by="max_checkins" if any(
        p.stopped_by == "max_checkins" for p in done) else "duration")
    errors: Counter[str] = Counter()
    for part in done:
        merged.ok += part.ok
        merged.failed += part.failed
        errors.update(part.errors)
        merged.latencies.extend(part.latencies)
        merged.connections += part.connections
        merged.resumed += part.resumed
        merged.renewals += part.renewals
        merged.cpu_s += part.cpu_s
        merged.elapsed_s = max(merged.elapsed_s, part.elapsed_s)
    merged.errors = dict(errors)
    return merged, merged.elapsed_s, prepare_s


def _merge_snapshots(snaps: list[SimulationSnapshot], elapsed: float) -> SimulationSnapshot:
    errors: Counter[str] = Counter()
    for snap in snaps:
        errors.update(snap.errors)

    def worst(values: list[float | None]) -> float | None:
        present = [v for v in values if v is not None]
        return max(present) if present else None

    return SimulationSnapshot(
        phase="running", elapsed_s=elapsed,
        devices_ready=sum(s.devices_ready for s in snaps),
        devices_total=sum(s.devices_total for s in snaps),
        checkins_ok=sum(s.checkins_ok for s in snaps),
        checkins_failed=sum(s.checkins_failed for s in snaps),
        rate_per_s=sum(s.rate_per_s for s in snaps),
        p50_ms=worst([s.p50_ms for s in snaps]), p90_ms=worst([s.p90_ms for s in snaps]),
        p99_ms=worst([s.p99_ms for s in snaps]),
        connections=sum(s.connections for s in snaps), resumed=sum(s.resumed for s in snaps),
        renewals=sum(s.renewals for s in snaps), errors=dict(errors))


# --- entry point ----------------------------------------------------------------------------------


def count_enrolled(root: Path) -> int:
    """Device directories under ``root`` whose state says ``enrolled`` (cheap: no key or
    certificate is loaded; :func:`run_simulation` skips the ones that do not load)."""
    count = 0
    for directory in _device_dirs(root):
        try:
            doc = json.loads((directory / "state.json").read_bytes())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("phase") == "enrolled":
            count += 1
    return count


def enroll_devices(
    config: SimulationConfig, *, on_progress: Callable[[int], None] | None = None
) -> tuple[int, int]:
    """Make ``config.state_root`` hold at least ``config.devices`` enrolled virtual devices,
    enrolling the missing ones through the operator API's bulk endpoint (needs ``server``,
    ``token``, ``batch_id``). Returns ``(already there, newly enrolled)``. For benchmarks that
    register many devices but run check-ins with fewer."""
    config.validate()
    if config.state_root is None:
        raise SimulationError("enroll_devices needs a state_root", code="bad_config")
    root = config.state_root
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    have = count_enrolled(root)
    seed = config.seed if config.seed is not None else secrets.randbits(64)
    rng = random.Random(seed)  # noqa: S311  # synthetic manifests, not cryptography
    new = _enroll_missing(config, root, config.devices - have, rng, on_progress or (lambda _: None))
    return have, len(new)



def run_simulation(
    config: SimulationConfig,
    *,
    on_progress: Callable[[SimulationSnapshot], None] | None = None,
) -> SimulationReport:
    """Enroll (or reuse) ``config.devices`` virtual devices and run their check-ins.

    Raises :class:`SimulationError` for a bad configuration (non-loopback URL included) or a
    failed enrollment. Check-in failures are not exceptions: they are counted in the report.
    """
    config.validate()
    seed = config.seed if config.seed is not None else secrets.randbits(64)
    rng = random.Random(seed)  # noqa: S311  # synthetic manifests, not cryptography
    started_at = format_time(dt.datetime.now(dt.UTC))
    temporary = config.state_root is None
    root = Path(tempfile.mkdtemp(prefix="fleettrust-sim-")) if temporary else config.state_root
    assert root is not None
    clock = time.perf_counter()

    def enrolling(done: int) -> None:
        if on_progress is not None:
            on_progress(SimulationSnapshot(
                phase="enrolling", elapsed_s=time.perf_counter() - clock,
                devices_ready=len(existing) + done, devices_total=config.devices,
                checkins_ok=0, checkins_failed=0, rate_per_s=0.0, p50_ms=None, p90_ms=None,
                p99_ms=None, connections=0, resumed=0, renewals=0, errors={}))

    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        existing = _load_existing(root, config.devices)
        enrolling(0)
        new = _enroll_missing(config, root, config.devices - len(existing), rng, enrolling)
        enroll_s = time.perf_counter() - clock
        identities = [*existing, *new]
        processes = min(config.processes, len(identities))
        if on_progress is not None:
            on_progress(SimulationSnapshot(
                phase="preparing", elapsed_s=time.perf_counter() - clock,
                devices_ready=len(identities), devices_total=config.devices, checkins_ok=0,
                checkins_failed=0, rate_per_s=0.0, p50_ms=None, p90_ms=None, p99_ms=None,
                connections=0, resumed=0, renewals=0, errors={}))
        if processes > 1:
            per_process = dataclasses.replace(
                config, processes=1, concurrency=max(1, config.concurrency // processes))
            part, elapsed, prepare_s = _run_processes(
                dataclasses.replace(per_process, processes=processes), identities, seed,
                on_progress)
            done_snapshot: SimulationSnapshot | None = None
        else:
            prepare_clock = time.perf_counter()
            devices = [_prepare(identity, config, i) for i, identity in enumerate(identities)]
            prepare_s = time.perf_counter() - prepare_clock
            cpu = 0.0

            async def mark() -> None:
                nonlocal cpu
                cpu = time.process_time()

            run, elapsed = asyncio.run(_run_checkins(config, devices, on_progress, seed,
                                                     before_start=mark))
            part = _partial(run, elapsed, time.process_time() - cpu, prepare_s)
            done_snapshot = run.snapshot("done", elapsed, max(elapsed, 1e-9))
    finally:
        if temporary:
            shutil.rmtree(root, ignore_errors=True)
    latencies = sorted(part.latencies)
    latency_ms: dict[str, float | None] = {
        "p50": _ms(percentile(latencies, 50)), "p90": _ms(percentile(latencies, 90)),
        "p99": _ms(percentile(latencies, 99)), "max": _ms(latencies[-1] if latencies else None),
        "mean": _ms(statistics.fmean(latencies) if latencies else None)}
    connections = part.connections
    report = SimulationReport(
        mode=config.mode, gateway=config.gateway, devices=len(identities),
        devices_enrolled=len(new), devices_reused=len(existing), concurrency=config.concurrency,
        duration_s=config.duration_s, elapsed_s=round(elapsed, 3), enroll_s=round(enroll_s, 3),
        prepare_s=round(prepare_s, 3), checkins_ok=part.ok, checkins_failed=part.failed,
        checkins_per_s=round(part.ok / elapsed, 1) if elapsed > 0 else 0.0,
        latency_ms=latency_ms, errors=dict(sorted(part.errors.items())),
        connections=connections, resumed_connections=part.resumed,
        handshakes_per_s=round(connections / elapsed, 1) if elapsed > 0 else 0.0,
        resumption_rate=(round(part.resumed / connections, 4) if connections else None),
        renewals=part.renewals, state_root=None if temporary else str(root),
        started_at=started_at, stopped_by=part.stopped_by, processes=processes,
        client=config.client, cpu_s=round(part.cpu_s, 3),
        cpu_ms_per_checkin=(round(part.cpu_s / part.ok * 1000, 4) if part.ok else None))
    if on_progress is not None:
        on_progress(done_snapshot if done_snapshot is not None else SimulationSnapshot(
            phase="done", elapsed_s=elapsed, devices_ready=len(identities),
            devices_total=len(identities), checkins_ok=part.ok, checkins_failed=part.failed,
            rate_per_s=part.ok / elapsed if elapsed > 0 else 0.0,
            p50_ms=latency_ms["p50"], p90_ms=latency_ms["p90"], p99_ms=latency_ms["p99"],
            connections=connections, resumed=part.resumed, renewals=part.renewals,
            errors=dict(part.errors)))
    return report


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def report_json(report: SimulationReport) -> str:
    return json.dumps(report.to_json(), indent=2, sort_keys=True)


def check_device_key(identity: Identity) -> bool:
    """True if the device's certificate is for its key (used by tests and benchmarks)."""
    return identity.certificate is not None and public_key_matches(
        identity.certificate.public_key(), identity.key.public_key())

