"""QR-code claiming: single-use claim codes, stored hashed, rate-limited guessing.

A claim code carries 160 bits from the CSPRNG (base32, grouped for humans). Only its SHA-256 is
stored; lookup is by hash and the final comparison is constant time. A device-owner account that
fails too many claims within the window is refused with 429 before the code is even looked up,
and failed attempts are counted in the database so the limit holds across server processes.
Not here: rendering the QR image (the CLI does that with segno).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from fleettrust.errors import ConflictError, NotFoundError, RateLimitedError, ValidationError
from fleettrust.ids import new_id
from fleettrust.services import audit
from fleettrust.services.auth import Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import check_factory_scope
from fleettrust.storage.models import ClaimAttempt, ClaimCode, Device

CODE_RE = re.compile(r"^FT1-[A-Z2-7]{32}$")


def _normalize(code: str) -> str:
    c = code.strip().upper().replace(" ", "")
    if c.startswith("FT1-"):
        c = "FT1-" + c[4:].replace("-", "")
    return c


def _hash(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedClaimCode:
    device_id: str
    code: str  # shown once; only the hash is stored
    expires_at: dt.datetime

    @property
    def claim_uri(self) -> str:
        return f"fleettrust:claim?device={self.device_id}&code={self.code}"


def create_claim_code(
    ctx: ServiceContext, principal: Principal, device_id: str, ttl_days: int | None = None
) -> IssuedClaimCode:
    """Create a fresh claim code for a device; any earlier unused code is revoked."""
    require(principal, "admin", "factory")
    ttl = ttl_days if ttl_days is not None else ctx.settings.claim_code_ttl_days
    if not 1 <= ttl <= 3650:
        raise ValidationError("ttl_days must be between 1 and 3650")
    now = ctx.clock.now()
    raw = base64.b32encode(secrets.token_bytes(20)).decode()  # 160 bits, 32 chars, no padding
    code = f"FT1-{raw}"
    with ctx.transaction() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"device {device_id} not found", code="device_not_found")
        check_factory_scope(principal, device.factory_id)
        if device.owner is not None:
            raise ConflictError(f"device {device_id} is already claimed", code="already_claimed")
        session.execute(
            update(ClaimCode)
            .where(ClaimCode.device_id == device_id, ClaimCode.used_at.is_(None),
                   ClaimCode.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        row = ClaimCode(
            id=new_id("clm"), device_id=device_id, code_sha256=_hash(code), created_at=now,
            expires_at=now + dt.timedelta(days=ttl), used_at=None, used_by=None, revoked_at=None,
        )
        session.add(row)
        audit.record(session, principal, "claim_code.create", "device", device_id, now,
                     claim_code_id=row.id, expires_at=row.expires_at.isoformat())
    return IssuedClaimCode(device_id=device_id, code=code, expires_at=row.expires_at)


def revoke_claim_codes(ctx: ServiceContext, principal: Principal, device_id: str) -> int:
    require(principal, "admin", "factory")
    now = ctx.clock.now()
    with ctx.transaction() as session:
        device = session.get(Device, device_id)
        if device is None:
            raise NotFoundError(f"device {device_id} not found", code="device_not_found")
        check_factory_scope(principal, device.factory_id)
        n = session.execute(
            update(ClaimCode)
            .where(ClaimCode.device_id == device_id, ClaimCode.used_at.is_(None),
                   ClaimCode.revoked_at.is_(None))
            .values(revoked_at=now)
        ).rowcount
        audit.record(session, principal, "claim_code.revoke", "device", device_id, now, count=n)
        return int(n)


def _recent_failures(session: Session, subject: str, since: dt.datetime) -> int:
    return int(session.scalar(
        select(func.count()).select_from(ClaimAttempt).where(
            ClaimAttempt.subject == subject, ClaimAttempt.attempted_at > since)
    ) or 0)


def claim_device(ctx: ServiceContext, principal: Principal, code: str) -> str:
    """Claim the device a code belongs to for the calling device-owner account."""
    require(principal, "device-owner")
    now = ctx.clock.now()
    window = dt.timedelta(seconds=ctx.settings.claim_failure_window_seconds)
    with ctx.transaction() as session:
        if _recent_failures(session, principal.subject, now - window) >= (
            ctx.settings.claim_failures_per_window
        ):
            raise RateLimitedError(
                "too many failed claim attempts; try again later", code="claim_rate_limited",
                retry_after=ctx.settings.claim_failure_window_seconds,
            )
    normalized = _normalize(code)
    failure: Exception | None = None
    if not CODE_RE.match(normalized):
        failure = ValidationError("claim code is malformed", code="claim_code_malformed")
    else:
        digest = _hash(normalized)
        with ctx.transaction() as session:
            row = session.scalars(
                select(ClaimCode).where(ClaimCode.code_sha256 == digest)
            ).first()
            if row is None or not hmac.compare_digest(row.code_sha256, digest):
                failure = NotFoundError("unknown claim code", code="claim_code_unknown")
            elif row.used_at is not None:
                failure = ConflictError("claim code was already used", code="claim_code_used")
            elif row.revoked_at is not None:
                failure = ConflictError("claim code was revoked", code="claim_code_revoked")
            elif row.expires_at <= now:
                failure = ConflictError("claim code has expired", code="claim_code_expired")
            else:
                device = session.get(Device, row.device_id)
                assert device is not None
                # Conditional update: of two concurrent claims exactly one wins.
                won = session.execute(
                    update(ClaimCode)
                    .where(ClaimCode.id == row.id, ClaimCode.used_at.is_(None))
                    .values(used_at=now, used_by=principal.subject)
                ).rowcount
                if won != 1 or device.owner is not None:
                    failure = ConflictError("claim code was already used", code="claim_code_used")
                else:
                    device.owner = principal.subject
                    audit.record(session, principal, "device.claim", "device", device.id, now,
                                 owner=principal.subject, claim_code_id=row.id)
                    return device.id
    with ctx.transaction() as session:
        session.add(ClaimAttempt(subject=principal.subject, attempted_at=now))
        session.execute(delete(ClaimAttempt).where(ClaimAttempt.attempted_at < now - window * 4))
    assert failure is not None
    raise failure
