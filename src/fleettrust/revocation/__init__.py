"""What is revoked, and how the world learns it.

- :mod:`fleettrust.revocation.index` — the in-memory status index (serial -> revoked / on hold),
  kept current from the ``revocations`` log in every process.
- :mod:`fleettrust.revocation.crl` — pure RFC 5280 CRL building (full, sharded, delta, CA-level).
- :mod:`fleettrust.revocation.crl_publisher` — CRL numbers, signing, storage and regeneration.

The operations that revoke live in :mod:`fleettrust.services.revocation`.
"""

from fleettrust.revocation.index import CertStatus, RevocationEvent, RevocationIndex, follow

__all__ = ["CertStatus", "RevocationEvent", "RevocationIndex", "follow"]
