"""Shared-secret fallback for constrained devices (Azure DPS group-enrollment pattern).

Each shared-secret batch has a group secret (returned once at creation, sealed at rest). The
per-device key is ``HMAC-SHA256(group_secret, device_id)``: the factory derives it and flashes it.
A device authenticates by answering a fresh server nonce with
``HMAC-SHA256(device_key, "fleettrust-auth-v1|" + device_id + "|" + nonce)``; nonces are
single-use and expire after two minutes, so a recorded answer cannot be replayed. A good answer
gives a short-lived session token (stored hashed). Such devices are marked ``weak_identity``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select, update

from fleettrust import pki
from fleettrust.errors import (
    AuthenticationError,
    ConflictError,
    FleetTrustError,
    NotFoundError,
    PolicyError,
    ValidationError,
)
from fleettrust.ids import new_device_id
from fleettrust.services import audit
from fleettrust.services.auth import Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import check_factory_scope
from fleettrust.storage.models import Batch, Device, DeviceNonce, DeviceSession

NONCE_TTL = dt.timedelta(minutes=2)
SESSION_TTL = dt.timedelta(hours=1)


def derive_device_key(group_secret: str, device_id: str) -> bytes:
    return hmac.new(group_secret.encode(), device_id.encode(), hashlib.sha256).digest()


def response_mac(device_key: bytes, device_id: str, nonce: str) -> str:
    msg = f"fleettrust-auth-v1|{device_id}|{nonce}".encode()
    return hmac.new(device_key, msg, hashlib.sha256).hexdigest()


def register_devices(
    ctx: ServiceContext,
    principal: Principal,
    batch_id: str,
    items: list[dict[str, Any]],
) -> list[str]:
    """Register shared-secret devices (no certificate) into a shared-secret batch."""
    require(principal, "admin", "factory")
    if not items or len(items) > ctx.settings.max_bulk_items:
        raise ValidationError(f"1 to {ctx.settings.max_bulk_items} devices per request")
    now = ctx.clock.now()
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for line, item in enumerate(items, start=1):
        try:
            manifest = pki.normalize_manifest(item.get("manifest") or {})
            device_id = item.get("device_id") or new_device_id()
            if not isinstance(device_id, str):
                raise ValidationError("device_id must be a string", code="bad_device_id")
            pki.check_device_id(device_id)
            rows.append({"id": device_id, "manifest": json.loads(pki.canonical_json(manifest)),
                         "manifest_sha256": pki.manifest_hash(manifest).hex()})
        except FleetTrustError as exc:
            errors.append({"line": line, "code": exc.code, "message": exc.message})
    with ctx.transaction() as session:
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise NotFoundError(f"batch {batch_id} not found", code="batch_not_found")
        check_factory_scope(principal, batch.factory_id)
        if batch.auth_method != "shared_secret":
            raise PolicyError("this batch issues certificates; it has no group secret",
                              code="batch_is_certificate")
        ids = [r["id"] for r in rows]
        for existing in session.scalars(select(Device.id).where(Device.id.in_(ids))):
            errors.append({"line": ids.index(existing) + 1, "code": "device_exists",
                           "message": f"device {existing} is already registered"})
        if errors:
            raise ValidationError(f"{len(errors)} lines rejected; nothing was registered",
                                  code="bulk_rejected", errors=errors)
        n = len(rows)
        if session.execute(
            update(Batch).where(Batch.id == batch_id, Batch.issued_count + n <= Batch.planned_size)
            .values(issued_count=Batch.issued_count + n)
        ).rowcount != 1:
            raise PolicyError(f"batch {batch_id} is full", code="batch_full")
        session.execute(insert(Device), [
            {**r, "batch_id": batch_id, "factory_id": batch.factory_id, "status": "active",
             "auth_method": "shared_secret", "key_origin": "none", "weak_identity": True,
             "station": None, "owner": None, "created_at": now, "last_seen_at": None}
            for r in rows
        ])
        audit.record_many(session, principal, "device.manufactured", "device", now, [
            (r["id"], {"batch_id": batch_id, "factory_id": batch.factory_id,
                       "auth_method": "shared_secret", "manifest_sha256": r["manifest_sha256"]})
            for r in rows
        ])
    return ids


def issue_challenge(ctx: ServiceContext, device_id: str) -> str:
    """A fresh single-use nonce for ``device_id`` (unauthenticated endpoint)."""
    pki.check_device_id(device_id)
    now = ctx.clock.now()
    nonce = secrets.token_urlsafe(24)
    with ctx.transaction() as session:
        device = session.get(Device, device_id)
        # Do not reveal whether the device exists: always hand out a nonce.
        if device is not None and device.auth_method == "shared_secret":
            session.add(DeviceNonce(
                nonce_sha256=hashlib.sha256(nonce.encode()).hexdigest(), device_id=device_id,
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
    now = ctx.clock.now()
    if len(nonce) > 64 or len(mac_hex) != 64:
        raise AuthenticationError("malformed challenge response", code="response_malformed")
    nonce_hash = hashlib.sha256(nonce.encode()).hexdigest()
    with ctx.transaction() as session:
        row = session.get(DeviceNonce, nonce_hash)
        if row is None or row.device_id != device_id:
            raise AuthenticationError("unknown nonce", code="nonce_unknown")
        if row.used_at is not None:
            raise AuthenticationError("nonce already used (replay)", code="nonce_replayed")
        if row.expires_at <= now:
            raise AuthenticationError("nonce expired", code="nonce_expired")
        # Consume the nonce first, conditionally, so two concurrent answers cannot both pass.
        if session.execute(
            update(DeviceNonce).where(DeviceNonce.nonce_sha256 == nonce_hash,
                                      DeviceNonce.used_at.is_(None)).values(used_at=now)
        ).rowcount != 1:
            raise AuthenticationError("nonce already used (replay)", code="nonce_replayed")
        device = session.get(Device, device_id)
        assert device is not None
        batch = session.get(Batch, device.batch_id)
        assert batch is not None and batch.group_secret_enc is not None
        group_secret = ctx.secret_box.open(batch.group_secret_enc, batch.id.encode()).decode()
        expected = response_mac(derive_device_key(group_secret, device_id), device_id, nonce)
        if not hmac.compare_digest(expected, mac_hex.lower()):
            audit.record(session, _device_principal(device_id, remote_addr),
                         "device.auth_failed", "device", device_id, now, method="shared_secret")
            raise AuthenticationError("wrong challenge response", code="response_invalid")
        if device.status != "active":
            raise ConflictError(f"device is {device.status}", code=f"device_{device.status}")
        token = secrets.token_urlsafe(32)
        session.add(DeviceSession(
            token_sha256=hashlib.sha256(token.encode()).hexdigest(), device_id=device_id,
            created_at=now, expires_at=now + SESSION_TTL,
        ))
        device.last_seen_at = now
        return DeviceSessionToken(device_id=device_id, token=token, expires_at=now + SESSION_TTL)


def _device_principal(device_id: str, remote_addr: str | None) -> Principal:
    return Principal(token_id="-", role="device", subject=device_id, remote_addr=remote_addr)


def authenticate_session(ctx: ServiceContext, token: str) -> str:
    """Device id of a valid shared-secret session token."""
    now = ctx.clock.now()
    with ctx.sessions() as session:
        row = session.get(DeviceSession, hashlib.sha256(token.encode()).hexdigest())
        if row is None or row.expires_at <= now:
            raise AuthenticationError("unknown or expired device session", code="session_invalid")
        return row.device_id
