"""Certificate serial numbers.

:func:`new_serial` draws a fresh serial from the operating system CSPRNG (``secrets``): 160
random bits with the top bit cleared, i.e. 159 bits of entropy, far above the 64 bits that
RFC 5280 §4.1.2.2 / CA/B Forum BR §7.1 require. The result is always positive and fits the
20-octet DER limit without a leading zero octet.

This module does not guarantee uniqueness: the database enforces ``UNIQUE (issuer, serial)``
and the caller retries on the (astronomically unlikely) collision.
"""

from __future__ import annotations

import secrets
from typing import Final

#: Serials are strictly below this bound (159 bits), so their DER INTEGER is at most 20 octets.
SERIAL_BITS: Final = 159
_MASK: Final = (1 << SERIAL_BITS) - 1


def new_serial() -> int:
    """Return a random positive serial number, 1 <= serial < 2**159."""
    while True:
        value = int.from_bytes(secrets.token_bytes(20), "big") & _MASK
        if value:
            return value


def is_valid_serial(serial: int) -> bool:
    """True if ``serial`` is positive and encodes in at most 20 DER octets (RFC 5280)."""
    return 0 < serial < (1 << SERIAL_BITS)


__all__ = ["SERIAL_BITS", "is_valid_serial", "new_serial"]
