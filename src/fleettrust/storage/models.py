"""SQLAlchemy ORM models of everything fleettrust stores.

Identifiers are short prefixed random strings (``fac_…``, ``bat_…``); certificate serials are
stored as lower-case hex (they exceed 64 bits). Private keys are never stored here: CA rows keep a
``key_id`` that names a key in the key store. Token secrets and claim codes are stored as SHA-256
hashes. ``audit_events`` is append-only (triggers refuse UPDATE and DELETE, see the migration).
"""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dt.datetime: UTCDateTime, dict[str, Any]: JSON}


class CertificateAuthority(Base):
    """One CA of the hierarchy: root (public part only), fleet, factory or batch CA."""

    __tablename__ = "cas"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # root | fleet | factory | batch
    name: Mapped[str] = mapped_column(String(200))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("cas.id"))
    factory_id: Mapped[str | None] = mapped_column(String(40), index=True)
    batch_id: Mapped[str | None] = mapped_column(String(40), index=True)
    # where the private key is: "platform" (our key store), "external" (a factory's token),
    # "offline" (the root, never on the server)
    key_location: Mapped[str] = mapped_column(String(16))
    key_id: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16))  # pending | active | revoked
    path_length: Mapped[int | None] = mapped_column(Integer)
    certificate_der: Mapped[bytes | None] = mapped_column(LargeBinary)
    serial_hex: Mapped[str | None] = mapped_column(String(48))
    subject_key_id: Mapped[str | None] = mapped_column(String(64))
    not_after: Mapped[dt.datetime | None]
    created_at: Mapped[dt.datetime]


class Factory(Base):
    __tablename__ = "factories"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    ca_id: Mapped[str] = mapped_column(ForeignKey("cas.id"))
    batch_cas: Mapped[bool] = mapped_column(Boolean, default=False)
    key_location: Mapped[str] = mapped_column(String(16))  # platform | external
    status: Mapped[str] = mapped_column(String(16))  # pending_ca | active | revoked
    created_at: Mapped[dt.datetime]


class Batch(Base):
    __tablename__ = "batches"
    __table_args__ = (UniqueConstraint("factory_id", "name", name="uq_batch_factory_name"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    factory_id: Mapped[str] = mapped_column(ForeignKey("factories.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    product_model: Mapped[str] = mapped_column(String(100))
    hardware_revision: Mapped[str] = mapped_column(String(50))
    planned_size: Mapped[int] = mapped_column(Integer)
    issued_count: Mapped[int] = mapped_column(Integer, default=0)
    manufactured_on: Mapped[dt.date] = mapped_column(Date)
    ca_id: Mapped[str] = mapped_column(ForeignKey("cas.id"))
    own_ca: Mapped[bool] = mapped_column(Boolean, default=False)
    auth_method: Mapped[str] = mapped_column(String(16))  # certificate | shared_secret
    group_secret_enc: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16))  # active | closed | revoked
    created_at: Mapped[dt.datetime]


class Device(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id"), index=True)
    factory_id: Mapped[str] = mapped_column(ForeignKey("factories.id"), index=True)
    # active | suspended | quarantined | revoked | decommissioned
    status: Mapped[str] = mapped_column(String(16))
    auth_method: Mapped[str] = mapped_column(String(16))  # certificate | shared_secret
    key_origin: Mapped[str] = mapped_column(String(16))  # device | server | none
    weak_identity: Mapped[bool] = mapped_column(Boolean, default=False)
    manifest: Mapped[dict[str, Any]]
    manifest_sha256: Mapped[str] = mapped_column(String(64))
    station: Mapped[str | None] = mapped_column(String(100))
    owner: Mapped[str | None] = mapped_column(String(200), index=True)
    created_at: Mapped[dt.datetime]
    last_seen_at: Mapped[dt.datetime | None]
    # device channel state (written at check-in)
    status_reason: Mapped[str | None] = mapped_column(String(200), default=None)
    last_remote_addr: Mapped[str | None] = mapped_column(String(64), default=None)
    last_session: Mapped[str | None] = mapped_column(String(64), default=None)
    firmware_version: Mapped[str | None] = mapped_column(String(64), default=None)
    boot_counter: Mapped[int | None] = mapped_column(BigInteger, default=None)
    agent_generation: Mapped[int | None] = mapped_column(BigInteger, default=None)
    uptime_s: Mapped[int | None] = mapped_column(BigInteger, default=None)
    health: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    checkin_count: Mapped[int] = mapped_column(BigInteger, default=0)


class StatusChange(Base):
    """Monotonic log of device / certificate status changes that enforcement must act on.

    Every server process polls ``id > last_seen`` and closes connections of affected devices,
    so a change made through one process is enforced by all of them.
    """

    __tablename__ = "status_changes"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str | None] = mapped_column(String(64), index=True)
    serial_hex: Mapped[str | None] = mapped_column(String(48))
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(200))
    created_at: Mapped[dt.datetime]


class ServerCredential(Base):
    """TLS server certificates fleettrust issues to itself (the device gateway)."""

    __tablename__ = "server_credentials"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    purpose: Mapped[str] = mapped_column(String(32), index=True)
    key_id: Mapped[str] = mapped_column(String(200))
    certificate_der: Mapped[bytes] = mapped_column(LargeBinary)
    names: Mapped[dict[str, Any]]
    not_after: Mapped[dt.datetime]
    created_at: Mapped[dt.datetime]


class Certificate(Base):
    """Every certificate fleettrust signs (devices, CAs, servers, OCSP responders)."""

    __tablename__ = "certificates"

    serial_hex: Mapped[str] = mapped_column(String(48), primary_key=True)  # never reused
    ca_id: Mapped[str] = mapped_column(String(40), index=True)  # issuing CA
    kind: Mapped[str] = mapped_column(String(16))  # device | ca | server | ocsp
    device_id: Mapped[str | None] = mapped_column(String(64), index=True)
    subject_ca_id: Mapped[str | None] = mapped_column(String(40))  # for kind == ca
    der: Mapped[bytes] = mapped_column(LargeBinary)
    public_key_sha256: Mapped[str] = mapped_column(String(64), index=True)
    not_before: Mapped[dt.datetime]
    not_after: Mapped[dt.datetime]
    status: Mapped[str] = mapped_column(String(16), default="good")  # good | revoked | hold
    revoked_at: Mapped[dt.datetime | None]
    revocation_reason: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(index=True)


class HardwareIdentifier(Base):
    """One (kind, value) hardware claim of one device. Not unique on purpose: clones happen."""

    __tablename__ = "hardware_ids"
    __table_args__ = (Index("ix_hwid_kind_value", "kind", "value"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(80))
    value: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[dt.datetime]


class Finding(Base):
    """A suspicion about a device (identity issue builds the full audit on this)."""

    __tablename__ = "findings"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    severity: Mapped[str] = mapped_column(String(16))  # low | medium | high | critical
    reason_code: Mapped[str] = mapped_column(String(64))
    device_id: Mapped[str | None] = mapped_column(String(64), index=True)
    evidence: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(String(16))  # open | suppressed | resolved
    created_at: Mapped[dt.datetime]


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # public part of the token
    secret_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(200))
    factory_id: Mapped[str | None] = mapped_column(String(40))
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime | None]
    revoked_at: Mapped[dt.datetime | None]


class AuditEvent(Base):
    """Append-only, self-contained record of one state-changing operation."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    occurred_at: Mapped[dt.datetime] = mapped_column(index=True)
    actor: Mapped[str] = mapped_column(String(200))
    actor_role: Mapped[str] = mapped_column(String(32))
    action: Mapped[str] = mapped_column(String(64), index=True)
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(200), index=True)
    remote_addr: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any]]


class ClaimCode(Base):
    __tablename__ = "claim_codes"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    code_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]
    used_by: Mapped[str | None] = mapped_column(String(200))
    revoked_at: Mapped[dt.datetime | None]


class ClaimAttempt(Base):
    """Failed claim attempts per account, for rate limiting guesses across processes."""

    __tablename__ = "claim_attempts"
    __table_args__ = (Index("ix_claim_attempt_subject_ts", "subject", "attempted_at"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    subject: Mapped[str] = mapped_column(String(200))
    attempted_at: Mapped[dt.datetime]


class DeviceNonce(Base):
    """Single-use challenge for shared-secret devices (no replay)."""

    __tablename__ = "device_nonces"

    nonce_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    expires_at: Mapped[dt.datetime]
    used_at: Mapped[dt.datetime | None]


class DeviceSession(Base):
    """Short-lived bearer session handed to a shared-secret device after a good response."""

    __tablename__ = "device_sessions"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime]
    expires_at: Mapped[dt.datetime]


class Revocation(Base):
    """Monotonic log of revocation-state changes of certificates (the device revocation feed).

    ``seq`` is the feed position: agents ask for ``since=N``. One operator operation (revoke a
    batch) shares one ``operation_id`` across all rows it wrote. ``action`` is ``revoke``,
    ``hold`` (certificateHold) or ``release`` (hold lifted).
    """

    __tablename__ = "revocations"
    __table_args__ = (Index("ix_revocations_ca_seq", "ca_id", "seq"),)

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    serial_hex: Mapped[str] = mapped_column(String(48), index=True)
    ca_id: Mapped[str] = mapped_column(String(40))
    device_id: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # device | ca | server | ocsp
    action: Mapped[str] = mapped_column(String(16))  # revoke | hold | release
    reason: Mapped[str | None] = mapped_column(String(32))  # RFC 5280 CRLReason name
    revoked_at: Mapped[dt.datetime]
    operation_id: Mapped[str] = mapped_column(String(40), index=True)


class CrlState(Base):
    """Last CRL published per (issuing CA, shard); shard -1 is the CA-level/full CRL and -2 the
    delta CRL. ``crl_number`` only grows (updated with a conditional UPDATE, safe across
    processes)."""

    __tablename__ = "crl_state"
    __table_args__ = (UniqueConstraint("ca_id", "shard", name="uq_crl_state_ca_shard"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    ca_id: Mapped[str] = mapped_column(String(40))
    shard: Mapped[int] = mapped_column(Integer)
    crl_number: Mapped[int] = mapped_column(BigInteger)
    base_seq: Mapped[int] = mapped_column(BigInteger)  # revocation seq covered
    this_update: Mapped[dt.datetime]
    next_update: Mapped[dt.datetime]
    der: Mapped[bytes] = mapped_column(LargeBinary)
