"""Random identifiers for rows (``fac_…``, ``bat_…``) and devices; never derived from input."""

from __future__ import annotations

import base64
import secrets

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32, lower case


def new_id(prefix: str, nbytes: int = 10) -> str:
    """``prefix_`` + Crockford base32 of ``nbytes`` random bytes (80 bits by default)."""
    n = int.from_bytes(secrets.token_bytes(nbytes), "big")
    chars = []
    for _ in range((nbytes * 8 + 4) // 5):
        chars.append(_ALPHABET[n & 31])
        n >>= 5
    return f"{prefix}_{''.join(reversed(chars))}"


def new_device_id() -> str:
    """A device identifier with 100 bits of randomness, e.g. ``d-5k2x…``."""
    return "d-" + new_id("x", 13)[2:]


def new_secret(nbytes: int = 32) -> str:
    """URL-safe random secret (256 bits by default) for tokens and claim codes."""
    return base64.urlsafe_b64encode(secrets.token_bytes(nbytes)).rstrip(b"=").decode()
