"""The fleettrust exception tree, grouped by origin.

    FleetTrustError
    ├── ValidationError        input is malformed, oversized or violates a profile (HTTP 400/422)
    ├── AuthenticationError    no or bad credential (HTTP 401)
    ├── AuthorizationError     credential valid but not allowed to do this (HTTP 403)
    ├── NotFoundError          the named object does not exist (HTTP 404)
    ├── ConflictError          the operation conflicts with current state (HTTP 409)
    ├── RateLimitedError       too many attempts (HTTP 429)
    ├── PolicyError            refused by issuance policy (HTTP 422)
    └── KeyStoreError          a key could not be created, loaded or used (HTTP 500/503)

Only ``api`` turns these into HTTP problem documents (RFC 9457); only ``cli`` turns them into
exit codes. Each carries a stable machine-readable ``code`` and a precise human ``message``.
"""

from __future__ import annotations

from typing import Any


class FleetTrustError(Exception):
    """Base of every error fleettrust raises on purpose."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class ValidationError(FleetTrustError):
    status = 422
    code = "invalid_input"


class AuthenticationError(FleetTrustError):
    status = 401
    code = "unauthenticated"


class AuthorizationError(FleetTrustError):
    status = 403
    code = "forbidden"


class NotFoundError(FleetTrustError):
    status = 404
    code = "not_found"


class ConflictError(FleetTrustError):
    status = 409
    code = "conflict"


class RateLimitedError(FleetTrustError):
    status = 429
    code = "rate_limited"


class PolicyError(FleetTrustError):
    status = 422
    code = "policy_violation"


class KeyStoreError(FleetTrustError):
    status = 500
    code = "key_store_error"
