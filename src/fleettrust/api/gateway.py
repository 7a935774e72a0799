"""The device gateway application (its own listener, mutual TLS; see docs/device-protocol.md).

Before any handler runs, :func:`device_identity` maps the TLS-verified client certificate (or a
shared-secret session token) to a device and refuses unknown, revoked, on-hold, suspended,
quarantined (except check-in) and decommissioned devices, each with its own problem code, and
logs the refusal. The identity is cached per TLS connection and re-validated against the
database at most ``FRESHNESS_S`` later; a background task follows ``status_changes`` and closes
every open connection (event streams included) of a device whose status changed, in every
server process.

Revocation: every request is also checked, in O(1), against the process's
:class:`~fleettrust.revocation.index.RevocationIndex` (per-certificate entries and the rules of
batch / factory / CA / breach-window revocations, synced from the database every 100 ms by
:func:`~fleettrust.revocation.index.follow`). When a sync brings a revocation or hold, the
connections of the affected devices are closed at once; a new rule (a batch revoked) re-checks
every open connection's identity.

TLS handshake refusals (unknown CA, expired certificate) are logged from the TLS alert the
server sends.

Not here: the TLS server itself (``api.tls``) or any business rule (``services.gateway``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from cryptography import x509
from fastapi import Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fleettrust import __version__, pki
from fleettrust.api.problems import BodyLimitMiddleware, install_error_handlers
from fleettrust.api.tls import ConnectionRegistry, tls_info
from fleettrust.errors import AuthenticationError, AuthorizationError, FleetTrustError
from fleettrust.revocation.index import RevocationEvent, RevocationIndex, RevocationRule, follow
from fleettrust.services import gateway as svc
from fleettrust.services import shared_secret
from fleettrust.services.context import ServiceContext

log = logging.getLogger("fleettrust.gateway")
FRESHNESS_S = 1.0
WATCH_INTERVAL_S = 0.2
REVOCATION_SYNC_S = 0.1
CA_REFRESH_S = 2.0
MAX_BODY = 64 * 1024
_ALERTS = {
    40: "handshake_failure",
    42: "bad_certificate",
    43: "unsupported_certificate",
    44: "certificate_revoked",
    45: "certificate_expired",
    46: "certificate_unknown",
    48: "unknown_ca",
    49: "access_denied",
    51: "decrypt_error",
    116: "certificate_required",
}


@dataclass
class _CacheEntry:
    ident: svc.DeviceIdentity
    checked: float


class GatewayState:
    """Per-process state of the gateway: open connections and cached identities."""

    def __init__(
        self, ctx: ServiceContext, registry: ConnectionRegistry, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.ctx = ctx
        self.registry = registry
        self.ssl_context = ssl_context
        self.cache: dict[int, _CacheEntry] = {}
        self.by_device: dict[str, set[int]] = {}
        self.known_cas: set[str] = set()
        self.session_id_prefix = f"{os.getpid()}-"
        self.closed_total = 0
        self.index = RevocationIndex(ctx)
        self.ca_by_key_id: dict[str, str] = {}

    def check_revocation(self, ident: svc.DeviceIdentity) -> None:
        """Refuse a revoked or held certificate (or device), from memory: O(1)."""
        st = self.index.check(ident.serial_hex, ca_id=ident.ca_id, batch_id=ident.batch_id,
                              factory_id=ident.factory_id, device_id=ident.device_id,
                              issued_at=ident.issued_at)
        if st is None:
            return
        if ident.serial_hex is None:
            raise AuthorizationError("device is revoked", code="device_revoked")
        if st.status == "hold":
            raise AuthorizationError("certificate is on hold", code="certificate_on_hold")
        raise AuthorizationError("certificate is revoked", code="certificate_revoked")

    def precheck_certificate(self, cert_der: bytes) -> None:
        """Refuse a revoked certificate from what it says itself (serial, issuing CA from its
        AKI, batch from the device-binding extension) before any database query: a new
        connection of a device of a revoked batch is refused even while the database is busy
        writing that batch's revocation rows (SQLite has one writer, and sessions wait)."""
        try:
            cert = x509.load_der_x509_certificate(cert_der)
            aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
            binding = pki.device_binding_from_certificate(cert)
        except (ValueError, x509.ExtensionNotFound, FleetTrustError):
            return  # identify_certificate gives the precise refusal
        ca_id = self.ca_by_key_id.get(aki.key_identifier.hex()) if aki.key_identifier else None
        st = self.index.check(format(cert.serial_number, "x"), ca_id=ca_id,
                              batch_id=binding.batch_id if binding else None)
        if st is not None:
            if st.status == "hold":
                raise AuthorizationError("certificate is on hold", code="certificate_on_hold")
            raise AuthorizationError("certificate is revoked", code="certificate_revoked")

    def on_revocations(self, events: list[RevocationEvent]) -> None:
        """Close the connections of devices whose certificate was just revoked or held."""
        for device_id in {e.device_id for e in events if e.action != "release" and e.device_id}:
            if device_id in self.by_device:
                n = self.evict_device(device_id)
                log.info("device %s: certificate revoked/held, closed %d connection(s)",
                         device_id, n)

    def on_rules(self, rules: list[RevocationRule]) -> None:
        """A batch / factory / CA / window revocation: re-check every open connection."""
        refused: set[str] = set()
        for entry in list(self.cache.values()):
            try:
                self.check_revocation(entry.ident)
            except AuthorizationError:
                refused.add(entry.ident.device_id)
        for device_id in refused:
            n = self.evict_device(device_id)
            log.info("device %s: revoked by %s, closed %d connection(s)", device_id,
                     ", ".join(r.operation_id for r in rules), n)

    def evict_device(self, device_id: str) -> int:
        for cid in self.by_device.pop(device_id, set()):
            self.cache.pop(cid, None)
        n = self.registry.close(device_id)
        self.closed_total += n
        return n


def install_handshake_logging(context: ssl.SSLContext) -> None:
    """Log the reason of every TLS alert the gateway sends (a refused client certificate).

    Python's asyncio drops handshake errors silently; OpenSSL's message callback still sees the
    alert the server sends, which names the reason (unknown_ca, certificate_expired, ...).
    """

    def callback(
        conn: Any, direction: str, version: Any, content_type: Any, msg_type: Any, data: bytes
    ) -> None:
        if direction == "write" and int(content_type) == 21 and len(data) >= 2 and data[0] == 2:
            reason = _ALERTS.get(data[1], f"alert {data[1]}")
            log.warning("gateway refused TLS client in handshake: %s", reason)

    context._msg_callback = callback  # type: ignore[attr-defined]  # documented debug hook


def _state(request: Request) -> GatewayState:
    st: GatewayState = request.app.state.gateway
    return st


def _remote(request: Request) -> str | None:
    return request.client.host if request.client else None


async def _identify(request: Request, *, allow_quarantine: bool) -> svc.DeviceIdentity:
    st = _state(request)
    info = tls_info(request.scope)
    peer = info["peer_cert_der"] if info else None
    try:
        if peer is None:
            auth = request.headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() == "bearer" and token:
                ident = await run_in_threadpool(svc.identify_session, st.ctx, token.strip())
            else:
                raise AuthenticationError(
                    "a client certificate issued by the fleet is required",
                    code="client_certificate_required",
                )
        else:
            assert info is not None
            cid = info["connection_id"]
            entry = st.cache.get(cid)
            now = time.monotonic()
            if entry is None:
                st.precheck_certificate(peer)
                ident = await run_in_threadpool(svc.identify_certificate, st.ctx, peer)
                st.cache[cid] = _CacheEntry(ident, now)
                st.by_device.setdefault(ident.device_id, set()).add(cid)
                st.registry.bind(cid, ident.device_id)
            elif now - entry.checked > FRESHNESS_S:
                st.check_revocation(entry.ident)  # from memory, before waiting on the database
                ident = await run_in_threadpool(svc.refresh_status, st.ctx, entry.ident)
                st.cache[cid] = _CacheEntry(ident, now)
            else:
                ident = entry.ident
        st.check_revocation(ident)
        svc.check_allowed(ident, allow_quarantine=allow_quarantine)
        return ident
    except FleetTrustError as exc:
        log.warning(
            "gateway refused %s %s from %s: %s (%s)",
            request.method,
            request.url.path,
            _remote(request),
            exc.code,
            exc.message,
        )
        raise


async def device_any(request: Request) -> svc.DeviceIdentity:
    return await _identify(request, allow_quarantine=True)


async def device_active(request: Request) -> svc.DeviceIdentity:
    return await _identify(request, allow_quarantine=False)


CheckinDevice = Annotated[svc.DeviceIdentity, Depends(device_any)]
ActiveDevice = Annotated[svc.DeviceIdentity, Depends(device_active)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class HealthIn(_Strict):
    status: str = Field("ok", max_length=32)
    metrics: dict[str, float] = Field(default_factory=dict, max_length=32)


class CheckinIn(_Strict):
    firmware_version: str = Field(min_length=1, max_length=64)
    boot_counter: int = Field(ge=0, le=2**53)
    uptime_s: int = Field(ge=0, le=2**53)
    agent_generation: int | None = Field(None, ge=0, le=2**53)
    manifest: dict[str, Any]
    manifest_signature: str | None = Field(None, max_length=2048)
    health: HealthIn = Field(default_factory=HealthIn)


class RenewIn(_Strict):
    csr: str = Field(max_length=16384)
    old_key_proof: str = Field(max_length=2048)


class ChallengeIn(_Strict):
    device_id: str = Field(max_length=64)


class AuthIn(_Strict):
    device_id: str = Field(max_length=64)
    nonce: str = Field(max_length=64)
    mac: str = Field(max_length=64)


def create_gateway_app(
    ctx: ServiceContext, registry: ConnectionRegistry, ssl_context: ssl.SSLContext | None = None
) -> FastAPI:
    state = GatewayState(ctx, registry, ssl_context)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(state.index.load)
        state.ca_by_key_id = await asyncio.to_thread(svc.ca_ids_by_key_id, ctx)

        def on_events(events: list[RevocationEvent]) -> None:  # sync thread -> event loop
            loop.call_soon_threadsafe(state.on_revocations, events)

        def on_rules(rules: list[RevocationRule]) -> None:
            loop.call_soon_threadsafe(state.on_rules, rules)

        state.index.subscribe(on_events)
        state.index.subscribe_rules(on_rules)
        tasks = [asyncio.create_task(_watch(state)),
                 asyncio.create_task(follow(state.index, REVOCATION_SYNC_S))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="fleettrust device gateway", version=__version__, lifespan=lifespan)
    app.state.gateway = state
    install_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, default_limit=MAX_BODY)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/device/checkin")
    async def checkin(body: CheckinIn, request: Request, ident: CheckinDevice) -> dict[str, Any]:
        info = tls_info(request.scope)
        session = f"{state.session_id_prefix}{info['connection_id']}" if info else "secret-session"
        report = svc.CheckinReport(
            firmware_version=body.firmware_version,
            boot_counter=body.boot_counter,
            uptime_s=body.uptime_s,
            agent_generation=body.agent_generation,
            manifest=body.manifest,
            manifest_signature=body.manifest_signature,
            health=body.health.model_dump(),
        )
        try:
            return await run_in_threadpool(
                svc.checkin, ctx, ident, report, remote_addr=_remote(request), session_id=session
            )
        except FleetTrustError as exc:
            log.warning(
                "gateway refused check-in of %s: %s (%s)", ident.device_id, exc.code, exc.message
            )
            raise

    @app.post("/v1/device/renew")
    async def renew(body: RenewIn, request: Request, ident: ActiveDevice) -> dict[str, Any]:
        return await run_in_threadpool(
            svc.renew, ctx, ident, body.csr, body.old_key_proof, remote_addr=_remote(request)
        )

    @app.get("/v1/device/events")
    async def events(request: Request, ident: ActiveDevice) -> StreamingResponse:
        async def stream() -> AsyncIterator[bytes]:
            yield f'event: hello\ndata: {{"device_id": "{ident.device_id}"}}\n\n'.encode()
            while True:
                await asyncio.sleep(15)
                if await request.is_disconnected():
                    return
                yield b"event: ping\ndata: {}\n\n"

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    @app.post("/v1/device/challenge")
    def challenge(body: ChallengeIn) -> dict[str, str]:
        return {
            "device_id": body.device_id,
            "nonce": shared_secret.issue_challenge(ctx, body.device_id),
        }

    @app.post("/v1/device/auth")
    def auth(body: AuthIn, request: Request) -> dict[str, str]:
        tok = shared_secret.answer_challenge(
            ctx, body.device_id, body.nonce, body.mac, _remote(request)
        )
        return {
            "device_id": tok.device_id,
            "token": tok.token,
            "expires_at": tok.expires_at.isoformat(),
        }

    # The device revocation feed (since=N, snapshot, server-sent events) for devices.
    from fleettrust.api.feed_routes import gateway_router

    app.include_router(gateway_router)
    return app


class ChangeFollower:
    """Follows a table whose ids are assigned at insert but may commit out of order
    (PostgreSQL sequences): rows above a gap are processed at once, and the gap is waited for
    (re-queried) for up to ``GAP_WAIT_S`` before it is taken to be a rolled-back insert."""

    GAP_WAIT_S = 30.0

    def __init__(self, start: int) -> None:
        self.floor = start  # every id <= floor has been processed or given up on
        self.seen: set[int] = set()
        self.gap_since: float | None = None

    def new(self, rows: list[tuple[int, str | None, str]],
            now: float) -> list[tuple[int, str | None, str]]:
        fresh = [r for r in rows if r[0] > self.floor and r[0] not in self.seen]
        self.seen.update(r[0] for r in fresh)
        while self.floor + 1 in self.seen:
            self.floor += 1
            self.seen.discard(self.floor)
        if self.seen:
            if self.gap_since is None:
                self.gap_since = now
            elif now - self.gap_since > self.GAP_WAIT_S:
                self.floor = min(self.seen)
                self.seen.discard(self.floor)
                while self.floor + 1 in self.seen:
                    self.floor += 1
                    self.seen.discard(self.floor)
                self.gap_since = now if self.seen else None
        else:
            self.gap_since = None
        return fresh


async def _watch(state: GatewayState) -> None:
    """Follow ``status_changes`` (all processes write it) and drop affected connections;
    add newly created CAs to the client-verification store."""
    follower = ChangeFollower(await run_in_threadpool(svc.latest_status_change, state.ctx))
    next_ca = 0.0
    while True:
        try:
            changes = await run_in_threadpool(svc.status_changes_since, state.ctx,
                                              follower.floor)
            for _change_id, device_id, status in follower.new(changes, time.monotonic()):
                if device_id is not None and status != "active":
                    n = state.evict_device(device_id)
                    log.info("device %s is %s: closed %d connection(s)", device_id, status, n)
            for cid in [c for c in state.cache if c not in state.registry]:
                entry = state.cache.pop(cid)
                state.by_device.get(entry.ident.device_id, set()).discard(cid)
            if state.ssl_context is not None and time.monotonic() >= next_ca:
                next_ca = time.monotonic() + CA_REFRESH_S
                state.ca_by_key_id = await run_in_threadpool(svc.ca_ids_by_key_id, state.ctx)
                for p in await run_in_threadpool(svc.active_ca_pems, state.ctx):
                    if p not in state.known_cas:
                        state.ssl_context.load_verify_locations(cadata=p)
                        state.known_cas.add(p)
        except Exception:
            log.exception("gateway status watcher failed; retrying")
        await asyncio.sleep(WATCH_INTERVAL_S)
