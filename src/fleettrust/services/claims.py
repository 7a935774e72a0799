"""QR-code claiming: single-use claim codes, stored hashed, rate-limited guessing.

A claim code carries 160 bits from the CSPRNG (``FT1-`` + 32 base32 characters). Only its
SHA-256 is stored (the code is high-entropy, so a slow password hash would add nothing); lookup
is by hash and the final comparison is constant time. Creating a code revokes the device's
earlier unused codes, so a device has at most one live code.

A claim is one transaction: the account's recent failures are counted first (429
``claim_rate_limited`` with ``retry_after`` once ``claim_failures_per_window`` is reached), then
the code is checked and the device row locked; a failure is recorded in ``claim_attempts`` in
the same transaction. Attempts live in the database, so the limit holds across server
processes; on PostgreSQL an advisory lock per account serialises one account's claims (SQLite
serialises writers anyway), so concurrent guesses cannot overshoot the limit either. Of two
concurrent claims of one code exactly one wins.

Not here: rendering the QR image (the CLI does that with segno).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import math
import re
import secrets
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

from sqlalchemy import CursorResult, delete, select, text, update
from sqlalchemy.orm import Session

from fleettrust.errors import (
    ConflictError,
    FleetTrustError,
    NotFoundError,
    RateLimitedError,
    ValidationError,
)
from fleettrust.ids import new_id
from fleettrust.services import audit
from fleettrust.services.auth import Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import check_factory_scope
from fleettrust.storage.models import ClaimAttempt, ClaimCode, Device

CODE_PREFIX = "FT1-"
CODE_BYTES = 20  # 160 bits
CODE_RE = re.compile(r"^FT1-[A-Z2-7]{32}$")


def _normalize(code: str) -> str:
    """Upper-case, without spaces and without the grouping dashes after the prefix."""
    c = code.strip().upper().replace(" ", "")
    if c.startswith(CODE_PREFIX):
        c = CODE_PREFIX + c[len(CODE_PREFIX):].replace("-", "")
    return c


def hash_code(code: str) -> str:
    """SHA-256 (hex) of a normalized claim code: the only form the database holds."""
    return hashlib.sha256(_normalize(code).encode()).hexdigest()


def _rowcount(result: Any) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


@dataclass(frozen=True)
class IssuedClaimCode:
    device_id: str
    code: str  # shown once; only the hash is stored
    expires_at: dt.datetime

    @property
    def claim_uri(self) -> str:
        """What the QR code on the box encodes."""
        return f"fleettrust:claim?device={quote(self.device_id)}&code={self.code}"


def create_claim_code(
    ctx: ServiceContext, principal: Principal, device_id: str, ttl_days: int | None = None
) -> IssuedClaimCode:
    """Create a fresh claim code for a device; any earlier unused code is revoked."""
    require(principal, "admin", "factory")
    ttl = ttl_days if ttl_days is not None else ctx.settings.claim_code_ttl_days
    if not 1 <= ttl <= 3650:
        raise ValidationError("ttl_days must be between 1 and 3650", code="bad_ttl")
    now = ctx.clock.now()
    code = CODE_PREFIX + base64.b32encode(secrets.token_bytes(CODE_BYTES)).decode()
    with ctx.transaction() as session:
        # Lock the device row so concurrent creations leave exactly one live code.
        device = session.scalars(
            select(Device).where(Device.id == device_id).with_for_update()
        ).first()
        if device is None:
            raise NotFoundError(f"device {device_id} not found", code="device_not_found")
        check_factory_scope(principal, device.factory_id)
        if device.owner is not None:
            raise ConflictError(f"device {device_id} is already claimed", code="already_claimed")
        if device.status != "active":
            raise ConflictError(f"device {device_id} is {device.status}; it cannot be claimed",
                                code="device_not_active")
        replaced = _rowcount(session.execute(
            update(ClaimCode)
            .where(ClaimCode.device_id == device_id, ClaimCode.used_at.is_(None),
                   ClaimCode.revoked_at.is_(None))
            .values(revoked_at=now)
        ))
        row = ClaimCode(
            id=new_id("clm"), device_id=device_id, code_sha256=hash_code(code), created_at=now,
            expires_at=now + dt.timedelta(days=ttl), used_at=None, used_by=None, revoked_at=None,
        )
        session.add(row)
        audit.record(session, principal, "claim_code.create", "device", device_id, now,
                     claim_code_id=row.id, expires_at=row.expires_at.isoformat(),
                     replaced_codes=replaced)
    return IssuedClaimCode(device_id=device_id, code=code, expires_at=row.expires_at)


def revoke_claim_codes(ctx: ServiceContext, principal: Principal, device_id: str) -> int:
    """Revoke every unused claim code of a device; returns how many were revoked."""
    require(principal, "admin", "factory")
    now = ctx.clock.now()
    with ctx.transaction() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"device {device_id} not found", code="device_not_found")
        check_factory_scope(principal, device.factory_id)
        n = _rowcount(session.execute(
            update(ClaimCode)
            .where(ClaimCode.device_id == device_id, ClaimCode.used_at.is_(None),
                   ClaimCode.revoked_at.is_(None))
            .values(revoked_at=now)
        ))
        audit.record(session, principal, "claim_code.revoke", "device", device_id, now, count=n)
        return n


def _lock_account(session: Session, subject: str) -> None:
    """Serialise one account's claims on PostgreSQL (SQLite serialises all writers)."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(b"claim:" + subject.encode()).digest()[:8], "big",
                             signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": key})


def _rate_limit(session: Session, subject: str, now: dt.datetime, window: dt.timedelta,
                limit: int) -> None:
    recent = list(session.scalars(
        select(ClaimAttempt.attempted_at)
        .where(ClaimAttempt.subject == subject, ClaimAttempt.attempted_at > now - window)
        .order_by(ClaimAttempt.attempted_at.desc())
        .limit(limit)
    ))
    if len(recent) >= limit:
        # Allowed again once the oldest of the last ``limit`` failures leaves the window.
        retry = max(1, math.ceil((recent[-1] + window - now).total_seconds()))
        raise RateLimitedError(
            f"too many failed claim attempts ({limit} within {int(window.total_seconds())} s);"
            f" try again in {retry} s",
            code="claim_rate_limited", retry_after=retry,
        )


def claim_device(ctx: ServiceContext, principal: Principal, code: str) -> str:
    """Claim the device a code belongs to for the calling device-owner account."""
    require(principal, "device-owner")
    now = ctx.clock.now()
    window = dt.timedelta(seconds=ctx.settings.claim_failure_window_seconds)
    normalized = _normalize(code)
    failure: FleetTrustError | None = None
    with ctx.transaction() as session:
        _lock_account(session, principal.subject)
        _rate_limit(session, principal.subject, now, window,
                    ctx.settings.claim_failures_per_window)
        if not CODE_RE.match(normalized):
            failure = ValidationError(
                "claim code is malformed: expected FT1- followed by 32 base32 characters",
                code="claim_code_malformed")
        else:
            digest = hash_code(normalized)
            row = session.scalars(select(ClaimCode).where(ClaimCode.code_sha256 == digest)).first()
            if row is None or not hmac.compare_digest(row.code_sha256, digest):
                failure = NotFoundError("unknown claim code", code="claim_code_unknown")
            else:
                # Lock the device, then re-read the code: a concurrent claim that won meanwhile
                # is seen here (FOR UPDATE waits for it and reads the committed row).
                device = session.scalars(
                    select(Device).where(Device.id == row.device_id).with_for_update()
                    .execution_options(populate_existing=True)
                ).one()
                session.refresh(row)
                if row.used_at is not None:
                    failure = ConflictError("claim code was already used", code="claim_code_used")
                elif row.revoked_at is not None:
                    failure = ConflictError("claim code was revoked", code="claim_code_revoked")
                elif row.expires_at <= now:
                    failure = ConflictError("claim code has expired", code="claim_code_expired")
                elif device.owner is not None:
                    failure = ConflictError(f"device {device.id} is already claimed",
                                            code="already_claimed")
                elif _rowcount(session.execute(
                    update(ClaimCode).where(ClaimCode.id == row.id, ClaimCode.used_at.is_(None))
                    .values(used_at=now, used_by=principal.subject)
                )) != 1:  # belt and braces: the conditional update is the single-use guarantee
                    failure = ConflictError("claim code was already used", code="claim_code_used")
                else:
                    device.owner = principal.subject
                    audit.record(session, principal, "device.claim", "device", device.id, now,
                                 owner=principal.subject, claim_code_id=row.id)
                    return device.id
        session.add(ClaimAttempt(subject=principal.subject, attempted_at=now))
        session.execute(delete(ClaimAttempt).where(ClaimAttempt.attempted_at <= now - window))
    raise failure
