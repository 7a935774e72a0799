"""The transparency log, as pure code: an RFC 6962 / RFC 9162 Merkle tree and its proofs.

* :mod:`fleettrust.ledger.merkle` — hashes, MTH, inclusion and consistency proofs (shapes and
  verification exactly as RFC 9162 §2.1.3.2 / §2.1.4.2), an in-memory tree.
* :mod:`fleettrust.ledger.sth` — signed tree heads (RFC 6962 ``TreeHeadSignature``, ECDSA
  P-256) and the JSON of tree heads and proofs.
* :mod:`fleettrust.ledger.entry` — the canonical JSON a leaf holds (an audit event, with the
  certificates it issued; or a gap of audit ids that were never committed).
* :mod:`fleettrust.ledger.verify` — offline checks with nothing but the log's public key.

This package does no I/O and knows no database: ``fleettrust.services.ledger`` stores and
sequences the log, ``fleettrust.api.ledger_routes`` serves it, ``fleettrust.cli.log`` verifies.
"""

from __future__ import annotations
