"""Shared-secret fallback for constrained devices (Azure DPS group-enrollment pattern).

Each shared-secret batch has a group secret (returned once at creation, sealed at rest with
:class:`~fleettrust.services.secretbox.SecretBox`). The per-device key is
``HMAC-SHA256(group_secret, device_id)``: the factory derives it and flashes it. A device
authenticates by answering a fresh server nonce with
``HMAC-SHA256(device_key, "fleettrust-auth-v1|" + device_id + "|" + nonce)`` (lower-case hex).

Nonces are bound to one device, expire after two minutes and are single-use: an answer first
consumes its nonce with a conditional UPDATE (``used_at IS NULL``), and that consumption is
committed even when the answer turns out wrong, so a nonce can be tried once and a recorded
answer cannot be replayed (``nonce_replayed``), not even by two concurrent requests. A good
answer gives a one-hour session token (only its SHA-256 is stored). Such devices are marked
``weak_identity`` with ``auth_method = shared_secret`` in the registry.

Not here: the device-facing transport (``api.gateway``), device status rules beyond refusing a
session to a device that is not active.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, delete, func, insert, select, update
from sqlalchemy.orm import Session

from fleettrust import pki
from fleettrust.errors import (
    AuthenticationError,
    AuthorizationError,
    ConflictError,
    FleetTrustError,
    NotFoundError,
    PolicyError,
    ValidationError,
)
from fleettrust.ids import new_device_id, new_id
from fleettrust.services import audit
from fleettrust.services.auth import NO_TOKEN, Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import check_factory_scope
from fleettrust.storage.models import (
    Batch,
    Device,
    DeviceNonce,
    DeviceSession,
    Factory,
    Finding,
    HardwareIdentifier,
)

NONCE_TTL = dt.timedelta(minutes=2)
SESSION_TTL = dt.timedelta(hours=1)
#: Live (unused, unexpired) nonces kept per device; older ones are dropped when more are asked.
MAX_LIVE_NONCES = 16
NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MAC_RE = re.compile(r"^[0-9A-Fa-f]{64}$")
SESSION_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


def derive_device_key(group_secret: str, device_id: str) -> bytes:
    """The per-device key: HMAC-SHA256(group secret, device id) — what the factory flashes."""
    return hmac.new(group_secret.encode(), device_id.encode(), hashlib.sha256).digest()


def response_mac(device_key: bytes, device_id: str, nonce: str) -> str:
    """The device's answer to ``nonce`` (lower-case hex)."""
    msg = f"fleettrust-auth-v1|{device_id}|{nonce}".encode()
    return hmac.new(device_key, msg, hashlib.sha256).hexdigest()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


def register_devices(
    ctx: ServiceContext,
    principal: Principal,
    batch_id: str,
    items: list[dict[str, Any]],
) -> list[str]:
    """Register shared-secret devices (no certificate) into a shared-secret batch.

    All or nothing, like certificate issuance: every line is checked first and every failing
    line reported (``bulk_rejected`` with ``errors``). Hardware identifiers are indexed and one
    already claimed by another device becomes a ``hardware_id_conflict`` finding.
    """
    require(principal, "admin", "factory")
    if not items:
        raise ValidationError("no devices in the request", code="empty_request")
    if len(items) > ctx.settings.max_bulk_items:
        raise ValidationError(
            f"at most {ctx.settings.max_bulk_items} devices per request, got {len(items)}",
            code="too_many_items",
        )
    now = ctx.clock.now()
    rows: list[dict[str, Any]] = []
    lines: dict[str, int] = {}
    identifiers: dict[str, list[tuple[str, str]]] = {}
    errors: list[tuple[int, FleetTrustError]] = []
    for line, item in enumerate(items, start=1):
        try:
            raw_manifest = item.get("manifest")
            if not isinstance(raw_manifest, dict):
                raise ValidationError("manifest must be a JSON object", code="manifest_malformed")
            manifest = pki.normalize_manifest(raw_manifest)
            device_id = item.get("device_id")
            if device_id is None:
                device_id = new_device_id()
            if not isinstance(device_id, str):
                raise ValidationError("device_id must be a string", code="invalid_device_id")
            pki.check_device_id(device_id)
        except FleetTrustError as exc:
            errors.append((line, exc))
            continue
        if device_id in lines:
            errors.append((line, ValidationError(
                f"device id {device_id} repeats line {lines[device_id]}",
                code="duplicate_device_id")))
            continue
        lines[device_id] = line
        identifiers[device_id] = list(pki.identifiers(manifest))
        rows.append({"id": device_id, "manifest": json.loads(pki.canonical_json(manifest)),
                     "manifest_sha256": pki.manifest_hash(manifest).hex()})
    with ctx.transaction() as session:
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise NotFoundError(f"batch {batch_id} not found", code="batch_not_found")
        check_factory_scope(principal, batch.factory_id)
        if batch.auth_method != "shared_secret":
            raise PolicyError(
                f"batch {batch_id} issues certificates: issue device certificates into it"
                " instead of registering shared-secret devices",
                code="batch_is_certificate",
            )
        factory = session.get(Factory, batch.factory_id)
        if factory is None or factory.status != "active":
            status = factory.status if factory is not None else "missing"
            raise PolicyError(f"factory {batch.factory_id} is {status}",
                              code="factory_not_active")
        if batch.status != "active":
            raise PolicyError(f"batch {batch_id} is {batch.status}", code="batch_not_active")
        ids = [r["id"] for r in rows]
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            for existing in session.scalars(select(Device.id).where(Device.id.in_(chunk))):
                errors.append((lines[existing], ConflictError(
                    f"device {existing} is already registered", code="device_exists")))
        if errors:
            _reject(errors, len(items))
        n = len(rows)
        reserved = _rowcount(session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.issued_count + n <= Batch.planned_size)
            .values(issued_count=Batch.issued_count + n)
        ))
        if reserved != 1:
            session.refresh(batch)
            raise PolicyError(
                f"batch {batch_id} is full: {batch.issued_count} of {batch.planned_size}"
                f" registered, {n} requested",
                code="batch_full",
            )
        findings = _hardware_conflicts(session, identifiers, now)
        session.execute(insert(Device), [
            {**r, "batch_id": batch_id, "factory_id": batch.factory_id, "status": "active",
             "auth_method": "shared_secret", "key_origin": "none", "weak_identity": True,
             "station": None, "owner": None, "created_at": now, "last_seen_at": None}
            for r in rows
        ])
        hw_rows = [{"device_id": dev, "kind": k, "value": v, "created_at": now}
                   for dev, idents in identifiers.items() for k, v in idents]
        if hw_rows:
            session.execute(insert(HardwareIdentifier), hw_rows)
        if findings:
            session.execute(insert(Finding), [f for fs in findings.values() for f in fs])
        audit.record_many(session, principal, "device.manufactured", "device", now, [
            (r["id"], {"batch_id": batch_id, "factory_id": batch.factory_id,
                       "auth_method": "shared_secret", "weak_identity": True,
                       "manifest_sha256": r["manifest_sha256"],
                       "findings": [f["id"] for f in findings.get(r["id"], [])]})
            for r in rows
        ])
    return ids


def _reject(errors: list[tuple[int, FleetTrustError]], n_items: int) -> None:
    """Raise: the original error for a one-item request, ``bulk_rejected`` listing every line
    otherwise (the same contract as certificate issuance)."""
    errors.sort(key=lambda e: e[0])
    if n_items == 1:
        raise errors[0][1]
    listed = [{"line": line, "code": exc.code, "message": exc.message} for line, exc in errors]
    raise ValidationError(
        f"{len({line for line, _ in errors})} of {n_items} lines rejected; nothing was registered",
        code="bulk_rejected", errors=listed,
    )


def _hardware_conflicts(
    session: Session, identifiers: dict[str, list[tuple[str, str]]], now: dt.datetime
) -> dict[str, list[dict[str, Any]]]:
    """Findings for hardware identifiers another device (stored or in this request) claims."""
    claims: dict[tuple[str, str], list[str]] = {}
    for dev, idents in identifiers.items():
        for ident in idents:
            claims.setdefault(ident, []).append(dev)
    keys = list(claims)
    for start in range(0, len(keys), 400):
        chunk = keys[start : start + 400]
        kinds = {k for k, _ in chunk}
        values = {v for _, v in chunk}
        rows = session.execute(
            select(HardwareIdentifier.kind, HardwareIdentifier.value, HardwareIdentifier.device_id)
            .where(HardwareIdentifier.kind.in_(kinds), HardwareIdentifier.value.in_(values))
        )
        for kind, value, other in rows:
            if (kind, value) in claims:
                claims[(kind, value)].insert(0, other)
    out: dict[str, list[dict[str, Any]]] = {}
    for (kind, value), devices in claims.items():
        unique = list(dict.fromkeys(devices))
        if len(unique) < 2:
            continue
        for dev in unique:
            if dev not in identifiers:
                continue
            out.setdefault(dev, []).append({
                "id": new_id("fnd"), "kind": "hardware_id_conflict", "severity": "high",
                "reason_code": "CONFLICTING_HARDWARE_ID", "device_id": dev,
                "evidence": {"identifier_kind": kind, "identifier_value": value,
                             "claimed_by": unique, "stage": "registration"},
                "status": "open", "created_at": now,
            })
    return out


def issue_challenge(ctx: ServiceContext, device_id: str) -> str:
    """A fresh single-use nonce for ``device_id`` (unauthenticated endpoint).

    Whether the device exists is not revealed: an unknown device gets a nonce too, one that
    no answer can satisfy. At most :data:`MAX_LIVE_NONCES` live nonces are kept per device
    (the oldest are dropped), so the endpoint cannot be used to grow the table without bound.
    """
    pki.check_device_id(device_id)
    now = ctx.clock.now()
    nonce = secrets.token_urlsafe(24)
    with ctx.transaction() as session:
        device = session.get(Device, device_id)
        if device is not None and device.auth_method == "shared_secret":
            # Used/expired nonces are kept one more TTL so a late replay is still reported as
            # such, then purged.
            session.execute(delete(DeviceNonce).where(
                DeviceNonce.device_id == device_id, DeviceNonce.expires_at < now - NONCE_TTL))
            stale = list(session.scalars(
                select(DeviceNonce.nonce_sha256)
                .where(DeviceNonce.device_id == device_id, DeviceNonce.used_at.is_(None),
                       DeviceNonce.expires_at > now)
                .order_by(DeviceNonce.expires_at.desc())
                .offset(MAX_LIVE_NONCES - 1)
            ))
            if stale:
                session.execute(delete(DeviceNonce).where(DeviceNonce.nonce_sha256.in_(stale)))
            session.add(DeviceNonce(
                nonce_sha256=_sha256(nonce), device_id=device_id,
                expires_at=now + NONCE_TTL, used_at=None,
            ))
    return nonce


@dataclass(frozen=True)
class DeviceSessionToken:
    device_id: str
    token: str
    expires_at: dt.datetime


def answer_challenge(
    ctx: ServiceContext, device_id: str, nonce: str, mac_hex: str, remote_addr: str | None
) -> DeviceSessionToken:
    """Check a device's answer to a nonce and open a session (see the module docstring)."""
    if not NONCE_RE.match(nonce):
        raise AuthenticationError("nonce is malformed", code="response_malformed")
    if not MAC_RE.match(mac_hex):
        raise AuthenticationError("mac must be 64 hexadecimal characters (HMAC-SHA256)",
                                  code="response_malformed")
    pki.check_device_id(device_id)
    now = ctx.clock.now()
    nonce_hash = _sha256(nonce)
    failure: FleetTrustError
    with ctx.transaction() as session:
        row = session.get(DeviceNonce, nonce_hash)
        if row is None:
            failure = AuthenticationError("unknown nonce: ask for a challenge first",
                                          code="nonce_unknown")
        elif row.used_at is not None:
            failure = AuthenticationError("nonce was already used (replay)",
                                          code="nonce_replayed")
        elif row.expires_at <= now:
            failure = AuthenticationError("nonce has expired: ask for a new challenge",
                                          code="nonce_expired")
        # Consume the nonce first, conditionally, so two concurrent answers cannot both pass;
        # the consumption commits even when the answer below is wrong.
        elif _rowcount(session.execute(
            update(DeviceNonce).where(DeviceNonce.nonce_sha256 == nonce_hash,
                                      DeviceNonce.used_at.is_(None)).values(used_at=now)
        )) != 1:
            failure = AuthenticationError("nonce was already used (replay)",
                                          code="nonce_replayed")
        elif row.device_id != device_id:
            failure = AuthenticationError("this nonce was issued to another device",
                                          code="nonce_device_mismatch")
        else:
            device = session.get(Device, device_id)
            batch = session.get(Batch, device.batch_id) if device is not None else None
            if device is None or batch is None or batch.group_secret_enc is None:
                failure = AuthenticationError("device has no shared secret",
                                              code="nonce_unknown")
            else:
                group_secret = ctx.secret_box.open(batch.group_secret_enc,
                                                   batch.id.encode()).decode()
                expected = response_mac(derive_device_key(group_secret, device_id), device_id,
                                        nonce)
                who = _device_principal(device_id, remote_addr)
                if not hmac.compare_digest(expected, mac_hex.lower()):
                    audit.record(session, who, "device.auth_failed", "device", device_id, now,
                                 method="shared_secret", reason="response_invalid")
                    failure = AuthenticationError("wrong challenge response",
                                                  code="response_invalid")
                elif device.status != "active":
                    audit.record(session, who, "device.auth_failed", "device", device_id, now,
                                 method="shared_secret", reason=f"device_{device.status}")
                    failure = AuthorizationError(f"device {device_id} is {device.status}",
                                                 code=f"device_{device.status}")
                else:
                    token = secrets.token_urlsafe(32)
                    expires = now + SESSION_TTL
                    session_id = _sha256(token)
                    session.add(DeviceSession(token_sha256=session_id, device_id=device_id,
                                              created_at=now, expires_at=expires))
                    device.last_seen_at = now
                    audit.record(session, who, "device.authenticated", "device", device_id,
                                 now, method="shared_secret",
                                 session_expires_at=expires.isoformat())
                    return DeviceSessionToken(device_id=device_id, token=token,
                                              expires_at=expires)
    raise failure


def _device_principal(device_id: str, remote_addr: str | None) -> Principal:
    return Principal(token_id=NO_TOKEN, role="device", subject=device_id,
                     remote_addr=remote_addr)


def authenticate_session(ctx: ServiceContext, token: str) -> str:
    """Device id of a valid shared-secret session token (device status is the caller's job)."""
    if not SESSION_TOKEN_RE.match(token):
        raise AuthenticationError("device session token is malformed", code="session_invalid")
    now = ctx.clock.now()
    with ctx.sessions() as session:
        row = session.get(DeviceSession, _sha256(token))
        if row is None:
            raise AuthenticationError("unknown device session", code="session_invalid")
        if row.expires_at <= now:
            raise AuthenticationError("device session has expired: authenticate again",
                                      code="session_expired")
        return row.device_id


def purge_expired(ctx: ServiceContext) -> int:
    """Delete nonces and sessions that expired more than one TTL ago (housekeeping)."""
    now = ctx.clock.now()
    with ctx.transaction() as session:
        n = _rowcount(session.execute(
            delete(DeviceNonce).where(DeviceNonce.expires_at < now - NONCE_TTL)))
        n += _rowcount(session.execute(
            delete(DeviceSession).where(DeviceSession.expires_at < now - SESSION_TTL)))
        return n


def count_live_nonces(ctx: ServiceContext, device_id: str) -> int:
    now = ctx.clock.now()
    with ctx.sessions() as session:
        return int(session.scalar(
            select(func.count()).select_from(DeviceNonce).where(
                DeviceNonce.device_id == device_id, DeviceNonce.used_at.is_(None),
                DeviceNonce.expires_at > now)) or 0)
