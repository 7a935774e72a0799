"""ORM models of the revocation work (migration 0004): decided operations and CRL documents.

They live here rather than in ``fleettrust.storage.models`` only because that module belongs to
another work item; they share its ``Base`` and column types.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from fleettrust.storage.models import Base


class RevocationOperation(Base):
    """One decided revocation operation: its scope, as data, and whether every certificate it
    covers has been written to the ``revocations`` log yet (``state`` pending -> done).

    ``seq`` orders decisions (writers serialised). Scope fields: ``ca_ids`` are CAs whose own
    certificates are revoked and whose every leaf is revoked with them; ``batch_id`` /
    ``factory_id``: every device of that batch / factory; ``leaf_ca_ids`` with
    ``issued_after``/``issued_before``: the leaves those CAs issued in the window.
    """

    __tablename__ = "revocation_operations"
    __table_args__ = (
        UniqueConstraint("id", name="uq_revocation_operations_id"),
        Index("ix_revocation_operations_state", "state"),
    )

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    id: Mapped[str] = mapped_column(String(40))
    scope: Mapped[str] = mapped_column(String(16))  # device | batch | factory | window
    target_id: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(16))  # revoke | hold | release
    reason: Mapped[str | None] = mapped_column(String(32))
    revoked_at: Mapped[dt.datetime]
    batch_id: Mapped[str | None] = mapped_column(String(40))
    factory_id: Mapped[str | None] = mapped_column(String(40))
    ca_ids: Mapped[list[str]] = mapped_column(JSON)
    leaf_ca_ids: Mapped[list[str]] = mapped_column(JSON)
    issued_after: Mapped[dt.datetime | None]
    issued_before: Mapped[dt.datetime | None]
    covered: Mapped[int] = mapped_column(BigInteger)
    newly_revoked: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16))  # pending | done
    first_seq: Mapped[int | None] = mapped_column(BigInteger)
    last_seq: Mapped[int | None] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime]
    done_at: Mapped[dt.datetime | None]


class CrlDocument(Base):
    """The latest published CRL of each kind per (issuing CA, shard): ``kind`` is ``full``
    (shard >= 0, or -1 for the CA-level CRL), ``delta`` (its delta CRL) or ``anchor`` (the
    complete CRL the current delta is relative to). Numbers are allocated from ``crl_state``."""

    __tablename__ = "crl_documents"
    __table_args__ = (
        UniqueConstraint("ca_id", "shard", "kind", name="uq_crl_documents_ca_shard_kind"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ca_id: Mapped[str] = mapped_column(String(40))
    shard: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    crl_number: Mapped[int] = mapped_column(BigInteger)
    base_number: Mapped[int | None] = mapped_column(BigInteger)
    this_update: Mapped[dt.datetime]
    next_update: Mapped[dt.datetime]
    log_seq: Mapped[int] = mapped_column(BigInteger)  # revocations of this CA covered
    op_seq: Mapped[int] = mapped_column(BigInteger)  # revocation operations covered
    der: Mapped[bytes] = mapped_column(LargeBinary)


__all__ = ["CrlDocument", "RevocationOperation"]
