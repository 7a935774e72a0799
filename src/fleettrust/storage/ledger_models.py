"""ORM models of the transparency log (migration 0005): leaves, subtree hashes, tree heads, keys.

They live in their own module because ``fleettrust.storage.models`` belongs to another work
item; they share its ``Base`` and ``UTCDateTime``. Every table but ``log_keys`` is append-only:
the migration installs triggers that refuse UPDATE and DELETE, as for ``audit_events``.

* ``log_leaves`` — leaf ``leaf_index`` (0, 1, 2, … without holes): the exact leaf bytes, their
  RFC 6962 leaf hash, the audit event they log (unique: an event is logged once) and the device
  they are about (for a device's history). Gap leaves have no event.
* ``log_nodes`` — the hash of every *complete* subtree with two or more leaves. The subtree at
  level L, index i covers leaves ``[i·2^L, (i+1)·2^L)``; its key is ``node_id = L·2^48 + i``
  (:func:`node_id`; one integer key, so a proof's nodes are one ``IN`` list). Level 0 is
  ``log_leaves.leaf_hash``. Any root or proof of any tree size is a fold of O(log n) of these.
* ``log_sths`` — every signed tree head, newest last.
* ``log_certificates`` — which leaf logs each issued certificate (serial -> leaf).
* ``log_keys`` — the log's signing key: a key-store ``key_id`` and the public key.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, LargeBinary, String
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


NODE_LEVEL_SHIFT = 48  # up to 2^48 leaves per log, 63 levels fit in a signed 64-bit key


def node_id(level: int, index: int) -> int:
    """The ``log_nodes`` key of the complete subtree at ``level``, ``index``."""
    return (level << NODE_LEVEL_SHIFT) | index


def node_of(key: int) -> tuple[int, int]:
    return key >> NODE_LEVEL_SHIFT, key & ((1 << NODE_LEVEL_SHIFT) - 1)


class LogNode(Base):
    __tablename__ = "log_nodes"

    node_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
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
