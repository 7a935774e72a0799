"""API tokens and roles: who is calling, and may they do this?

A token looks like ``ft1.<id>.<secret>``; only SHA-256(secret) is stored and it is compared in
constant time. Roles: admin, factory (scoped to one factory), repair-centre, release-manager,
auditor (read-only), device-owner. This module does not decide business policy (which batch a
factory may issue into is checked by the issuance service using ``Principal.factory_id``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from fleettrust.errors import AuthenticationError, AuthorizationError, ValidationError
from fleettrust.ids import new_id, new_secret
from fleettrust.storage.models import ApiToken

ROLES = frozenset(
    {"admin", "factory", "repair-centre", "release-manager", "auditor", "device-owner"}
)
TOKEN_RE = re.compile(r"^ft1\.(tok_[0-9a-z]{16})\.([A-Za-z0-9_-]{43})$")
SUBJECT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._@:+-]{0,199}$")


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    token_id: str
    role: str
    subject: str
    factory_id: str | None = None
    remote_addr: str | None = None

    @property
    def actor(self) -> str:
        return f"{self.role}:{self.subject}"


#: ``token_id`` of principals that presented no API token (system, devices); not a secret.
NO_TOKEN = "-"  # noqa: S105
SYSTEM = Principal(token_id=NO_TOKEN, role="system", subject="fleettrust")


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def require(principal: Principal, *roles: str) -> None:
    if principal.role not in roles:
        raise AuthorizationError(
            f"role {principal.role!r} may not do this; needs one of: {', '.join(sorted(roles))}",
            code="role_not_allowed",
        )


def create_token(
    session: Session,
    *,
    role: str,
    subject: str,
    now: dt.datetime,
    factory_id: str | None = None,
    ttl_days: int | None = None,
) -> tuple[ApiToken, str]:
    """Create a token row and return it with the only copy of the secret token string."""
    if role not in ROLES:
        raise ValidationError(f"unknown role {role!r}; roles: {', '.join(sorted(ROLES))}")
    if not SUBJECT_RE.match(subject):
        raise ValidationError("token subject must be 1-200 printable characters")
    if (role == "factory") != (factory_id is not None):
        raise ValidationError("a factory token needs exactly one factory; other roles none")
    if ttl_days is not None and not 0 < ttl_days <= 3650:
        raise ValidationError("ttl_days must be between 1 and 3650")
    token_id = new_id("tok", 10)
    secret = new_secret(32)
    row = ApiToken(
        id=token_id,
        secret_sha256=hash_secret(secret),
        role=role,
        subject=subject,
        factory_id=factory_id,
        created_at=now,
        expires_at=now + dt.timedelta(days=ttl_days) if ttl_days else None,
        revoked_at=None,
    )
    session.add(row)
    return row, f"ft1.{token_id}.{secret}"


def authenticate(
    session: Session, token: str, now: dt.datetime, remote_addr: str | None = None
) -> Principal:
    m = TOKEN_RE.match(token)
    if m is None:
        raise AuthenticationError("malformed API token", code="token_malformed")
    row = session.get(ApiToken, m.group(1))
    # Compare even when the row is missing so timing does not reveal which ids exist.
    expected = row.secret_sha256 if row is not None else "0" * 64
    if not hmac.compare_digest(expected, hash_secret(m.group(2))) or row is None:
        raise AuthenticationError("unknown or wrong API token", code="token_invalid")
    if row.revoked_at is not None:
        raise AuthenticationError("API token has been revoked", code="token_revoked")
    if row.expires_at is not None and row.expires_at <= now:
        raise AuthenticationError("API token has expired", code="token_expired")
    return Principal(
        token_id=row.id,
        role=row.role,
        subject=row.subject,
        factory_id=row.factory_id,
        remote_addr=remote_addr,
    )


def count_admins(session: Session, now: dt.datetime | None = None) -> int:
    """Usable admin tokens: not revoked and, when ``now`` is given, not expired."""
    q = select(func.count()).select_from(ApiToken).where(
        ApiToken.role == "admin", ApiToken.revoked_at.is_(None)
    )
    if now is not None:
        q = q.where(or_(ApiToken.expires_at.is_(None), ApiToken.expires_at > now))
    return int(session.scalar(q) or 0)
