"""ORM models of the transparency log (migration 0005): leaves, subtree hashes, tree heads, keys.

They live in their own module because ``fleettrust.storage.models`` belongs to another work
item; they share its ``Base`` and ``UTCDateTime``. Every table but ``log_keys`` is append-only:
the migration installs triggers that refuse UPDATE and DELETE, as for ``audit_events``.

* ``log_leaves`` — leaf ``leaf_index`` (0, 1, 2, … without holes): the exact leaf bytes, their
  RFC 6962 leaf hash, the audit event they log (unique: an event is logged once) and the device
  they are about (for a device's history). Gap leaves have no event.
* ``log_nodes`` — the hash of every *complete* subtree with two or more leaves: ``level`` L,
  ``idx`` i covers leaves ``[i·2^L, (i+1)·2^L)`` (level 0 is ``log_leaves.leaf_hash``). Any root
  or proof of any tree size is a fold of O(log n) of these.
* ``log_sths`` — every signed tree head, newest last.
* ``log_certificates`` — which leaf logs each issued certificate (serial -> leaf).
* ``log_keys`` — the log's signing key: a key-store ``key_id`` and the public key.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, LargeBinary, SmallInteger, String
from sqlalchemy.orm import Mapped, mapped_column

from fleettrust.storage.models import Base


class LogKey(Base):
    __tablename__ = "log_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    key_id: Mapped[str] = mapped_column(String(200))
    public_key_der: Mapped[bytes] = mapped_column(LargeBinary)
    log_id_hex: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16))  # active | retired
    created_at: Mapped[dt.datetime]


class LogLeaf(Base):
    __tablename__ = "log_leaves"
    __table_args__ = (Index("ix_log_leaves_leaf_hash", "leaf_hash"),
                      Index("ix_log_leaves_device", "device_id", "leaf_index"))

    leaf_index: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    audit_event_id: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # audit_event | gap
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    device_id: Mapped[str | None] = mapped_column(String(64))
    sequenced_at: Mapped[dt.datetime]


class LogNode(Base):
    __tablename__ = "log_nodes"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hash: Mapped[bytes] = mapped_column(LargeBinary)


class LogSth(Base):
    __tablename__ = "log_sths"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    tree_size: Mapped[int] = mapped_column(BigInteger, index=True)
    timestamp_ms: Mapped[int] = mapped_column(BigInteger)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary)
    signature: Mapped[bytes] = mapped_column(LargeBinary)
    key_id: Mapped[str] = mapped_column(ForeignKey("log_keys.id"))
    created_at: Mapped[dt.datetime]


class LogCertificate(Base):
    __tablename__ = "log_certificates"

    serial_hex: Mapped[str] = mapped_column(String(48), primary_key=True)
    leaf_index: Mapped[int] = mapped_column(BigInteger)
    cert_sha256: Mapped[str] = mapped_column(String(64))
