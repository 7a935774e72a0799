"""Device issuance at manufacturing time: single, bulk and server-side key generation.

One request is one transaction, all or nothing:

1. Authorise and look at the batch (scope, state, room left) before spending CPU on the request.
2. Validate every item without touching the database: CSR parsing and self-signature, key
   policy, manifest, device id, station; duplicates inside the request. Every failing line is
   collected, not just the first.
3. In the write transaction: the batch again (it may have changed), conflicts with stored data
   (device ids given by the caller, public keys already certified). Any error: nothing is
   written and :class:`BulkRejectedError` lists every failing line with its code.
4. Reserve capacity with one conditional UPDATE, so two server processes cannot overfill a
   batch.
5. Only then sign (the device profile is built once per issuing CA and cached per process).
6. Record hardware identifiers another device already claims as findings (issuance goes on).
7. Insert devices, certificates, hardware identifiers, findings and one audit event per device
   in bulk (COPY on PostgreSQL, executemany on SQLite, both without per-row ORM work) and
   commit.

Serial numbers are 159-bit CSPRNG values and ``certificates.serial_hex`` is the primary key, so
the database refuses a reused serial even across processes.

Not here: who the caller is (``auth``), the X.509 layout (``pki.profiles``), clone scoring beyond
recording conflicting hardware identifiers (the identity issue builds on the findings).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from sqlalchemy import (
    JSON,
    Connection,
    String,
    Table,
    any_,
    bindparam,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleettrust import pki
from fleettrust.errors import (
    ConflictError,
    FleetTrustError,
    NotFoundError,
    PolicyError,
    ValidationError,
)
from fleettrust.ids import new_device_id, new_id
from fleettrust.pki.csr import CSR_MAX_BYTES
from fleettrust.services.auth import Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import ca_chain, check_factory_scope, crl_shard_urls, pem, urls
from fleettrust.storage.models import (
    AuditEvent,
    Base,
    Batch,
    Certificate,
    CertificateAuthority,
    Device,
    Factory,
    Finding,
    HardwareIdentifier,
)

KEY_ORIGINS: Final = frozenset({"device", "server"})
_QUERY_CHUNK: Final = 500  # bound parameters per IN (...) query


@dataclass(frozen=True)
class IssueRequest:
    """One device to issue: its CSR (PEM or DER) and hardware manifest."""

    csr: str | bytes
    manifest: dict[str, Any]
    device_id: str | None = None
    station: str | None = None


@dataclass(slots=True)
class _Prepared:
    line: int
    device_id: str
    id_given: bool  # chosen by the caller (so it may collide with a stored device)
    public_key: CertificatePublicKeyTypes
    key_fp: str
    manifest_json: str  # canonical JSON of the normalised manifest (pki.canonical_json)
    manifest_sha256: bytes
    identifiers: list[tuple[str, str]]
    station: str | None


@dataclass(frozen=True)
class IssuedDevice:
    device_id: str
    serial_hex: str
    certificate_pem: str
    findings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class IssueResult:
    batch_id: str
    devices: list[IssuedDevice]
    chain_pem: list[str]  # issuing CA first, root excluded
    root_pem: str


class BulkRejectedError(ValidationError):
    """A bulk request had failing lines; ``details["errors"]`` lists each (line, code, message)."""

    code = "bulk_rejected"


_LineError = tuple[int, FleetTrustError]


# --- step 2: validation without the database ----------------------------------------------------


def _prepare(line: int, item: IssueRequest) -> _Prepared:
    if not isinstance(item.manifest, dict):
        raise ValidationError("manifest must be a JSON object", code="manifest_malformed")
    csr = pki.load_csr(item.csr, max_bytes=CSR_MAX_BYTES)  # parses and verifies the signature
    public_key = csr.public_key()
    pki.check_key_allowed(public_key)
    manifest = pki.normalize_manifest(item.manifest)
    canonical = pki.canonical_json(manifest)
    if item.device_id is None:
        device_id, given = new_device_id(), False
    else:
        device_id, given = pki.check_device_id(item.device_id), True
    station = item.station
    if station is not None and (
        not isinstance(station, str) or not station or len(station) > 100
        or not station.isprintable()
    ):
        raise ValidationError("station must be 1-100 printable characters", code="bad_station")
    return _Prepared(
        line=line,
        device_id=device_id,
        id_given=given,
        public_key=public_key,
        key_fp=pki.public_key_fingerprint(public_key),
        manifest_json=canonical.decode("utf-8"),
        # == pki.manifest_hash(manifest), without serialising the manifest a second time
        manifest_sha256=hashlib.sha256(canonical).digest(),
        identifiers=pki.identifiers(manifest),
        station=station,
    )


def _prepare_all(items: Sequence[IssueRequest]) -> tuple[list[_Prepared], list[_LineError]]:
    prepared: list[_Prepared] = []
    errors: list[_LineError] = []
    for line, item in enumerate(items, start=1):
        try:
            prepared.append(_prepare(line, item))
        except FleetTrustError as exc:
            errors.append((line, exc))
    seen_ids: dict[str, int] = {}
    seen_keys: dict[str, int] = {}
    for p in prepared:
        first = seen_ids.setdefault(p.device_id, p.line)
        if first != p.line:
            errors.append((p.line, ValidationError(
                f"device id {p.device_id} repeats line {first}", code="duplicate_device_id")))
        first = seen_keys.setdefault(p.key_fp, p.line)
        if first != p.line:
            errors.append((p.line, PolicyError(
                f"public key repeats line {first}", code="key_reused")))
    return prepared, errors


def _reject(errors: list[_LineError], n_items: int) -> None:
    """Raise: the original error for a single-item request, BulkRejectedError otherwise."""
    errors.sort(key=lambda e: e[0])
    if n_items == 1:
        raise errors[0][1]
    listed = [{"line": line, "code": exc.code, "message": exc.message} for line, exc in errors]
    raise BulkRejectedError(
        f"{len({line for line, _ in errors})} of {n_items} lines rejected; nothing was issued",
        errors=listed,
    )


def _chunks(seq: Sequence[Any], size: int = _QUERY_CHUNK) -> list[Sequence[Any]]:
    return [seq[i : i + size] for i in range(0, len(seq), size)]


def _in_conditions(session: Session, column: Any, values: Sequence[str]) -> list[Any]:
    """``column IN values`` as a list of conditions to query one by one: a single array
    parameter on PostgreSQL (no per-value placeholders to build and parse), chunks elsewhere."""
    if not values:
        return []
    if session.get_bind().dialect.name == "postgresql":
        return [column == any_(bindparam(None, list(values), type_=pg.ARRAY(String)))]
    return [column.in_(chunk) for chunk in _chunks(values)]


# --- the batch -------------------------------------------------------------------------------


def _issuing_context(
    session: Session, principal: Principal, batch_id: str
) -> tuple[Batch, Factory, CertificateAuthority]:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise NotFoundError(f"batch {batch_id} not found", code="batch_not_found")
    check_factory_scope(principal, batch.factory_id)
    factory = session.get(Factory, batch.factory_id)
    ca = session.get(CertificateAuthority, batch.ca_id)
    if factory is None or ca is None:  # foreign keys make this impossible
        raise NotFoundError(f"batch {batch_id} has no factory or CA", code="batch_not_found")
    if factory.status != "active":
        raise PolicyError(f"factory {factory.id} is {factory.status}", code="factory_not_active")
    if batch.status != "active":
        raise PolicyError(f"batch {batch.id} is {batch.status}", code="batch_not_active")
    if batch.auth_method != "certificate":
        raise PolicyError(
            "this batch uses shared-secret devices: register them instead of issuing",
            code="batch_is_shared_secret",
        )
    if ca.key_location != "platform" or ca.key_id is None:
        raise PolicyError(
            "this factory keeps its CA key in its own token: issue at the factory and upload a"
            " signed manifest",
            code="factory_key_external",
        )
    if ca.status != "active":
        raise PolicyError(f"issuing CA {ca.id} is {ca.status}", code="ca_not_active")
    return batch, factory, ca


def _batch_full(batch: Batch, n: int) -> PolicyError:
    return PolicyError(
        f"batch {batch.id} is full: {batch.issued_count} of {batch.planned_size} issued,"
        f" {n} requested",
        code="batch_full",
    )


def _profile(ctx: ServiceContext, ca: CertificateAuthority) -> pki.DeviceProfile:
    """The per-process device profile of an issuing CA (immutable once the CA is active)."""

    def build() -> pki.DeviceProfile:
        if ca.key_id is None or ca.certificate_der is None:
            raise PolicyError(f"issuing CA {ca.id} cannot sign", code="ca_not_active")
        u = urls(ctx, ca.id)
        return pki.DeviceProfile(
            ctx.signer(ca.key_id),
            x509.load_der_x509_certificate(ca.certificate_der),
            organization=ctx.settings.organization,
            ocsp_url=u["ocsp"],
            ca_issuers_url=u["ca_issuers"],
        )

    profile: pki.DeviceProfile = ctx.cached("device-profile", ca.id, build)
    return profile


def _chain_pems(ctx: ServiceContext, session: Session, ca_id: str) -> list[str]:
    """PEMs from the issuing CA up to the root (CA certificates never change once active)."""
    chain: list[str] = ctx.cached(
        "chain-pem", ca_id, lambda: [pem(c) for c in ca_chain(session, ca_id)]
    )
    return chain


# --- step 3: conflicts with stored data -------------------------------------------------------


def _database_conflicts(session: Session, prepared: list[_Prepared]) -> list[_LineError]:
    errors: list[_LineError] = []
    given = {p.device_id: p for p in prepared if p.id_given}
    # Generated ids carry 104 random bits; the primary key still refuses a (never seen) clash.
    for cond in _in_conditions(session, Device.id, list(given)):
        for existing in session.scalars(select(Device.id).where(cond)):
            errors.append((given[existing].line, ConflictError(
                f"device {existing} is already registered", code="device_exists")))
    by_key = {p.key_fp: p for p in prepared}
    for cond in _in_conditions(session, Certificate.public_key_sha256, list(by_key)):
        rows = session.execute(
            select(Certificate.public_key_sha256, Certificate.device_id, Certificate.kind)
            .where(cond)
        )
        for fp, other, kind in rows:
            holder = f"device {other}" if other else f"a {kind} certificate"
            errors.append((by_key[fp].line, PolicyError(
                f"this public key is already certified ({holder})", code="key_reused")))
    return errors


_PG_HWID_LOOKUP: Final = text(
    "SELECT h.value, h.device_id FROM unnest(CAST(:values AS varchar[])) AS q(value)"
    " CROSS JOIN LATERAL (SELECT x.value, x.device_id FROM hardware_ids AS x"
    " WHERE x.kind = :kind AND x.value = q.value OFFSET 0) AS h"  # OFFSET 0: keep it a loop
)


def _hardware_conflicts(
    session: Session, prepared: list[_Prepared], now: dt.datetime
) -> dict[str, list[dict[str, Any]]]:
    """Hardware identifiers that another device (stored or in this request) already claims.

    Returns finding rows per new device. Few identifiers ever conflict, so the common path
    allocates one dict entry per identifier and nothing else.
    """
    first_claim: dict[tuple[str, str], str] = {}
    in_request: dict[tuple[str, str], list[str]] = {}  # claimed by 2+ devices of this request
    by_kind: dict[str, list[str]] = defaultdict(list)
    for p in prepared:
        dev = p.device_id
        for ident in p.identifiers:
            prev = first_claim.get(ident)
            if prev is None:
                first_claim[ident] = dev
                by_kind[ident[0]].append(ident[1])
            elif prev != dev:
                in_request.setdefault(ident, [prev]).append(dev)
    stored: dict[tuple[str, str], list[str]] = {}
    postgres = session.get_bind().dialect.name == "postgresql"
    for kind, values in by_kind.items():
        if postgres:
            # One probe of ix_hwid_kind_value per value whatever the planner's statistics say
            # (without them it scans every row of the kind and filters it against the list).
            results = [session.execute(_PG_HWID_LOOKUP, {"kind": kind, "values": values})]
        else:  # SQLite always probes the index for kind = ? AND value IN (...)
            results = [
                session.execute(
                    select(HardwareIdentifier.value, HardwareIdentifier.device_id).where(
                        HardwareIdentifier.kind == kind, HardwareIdentifier.value.in_(chunk)
                    )
                )
                for chunk in _chunks(values)
            ]
        for rows in results:
            for value, other in rows:
                stored.setdefault((kind, value), []).append(other)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ident in {*in_request, *stored}:
        new_devices = in_request.get(ident) or [first_claim[ident]]
        claimed_by = list(dict.fromkeys([*stored.get(ident, ()), *new_devices]))
        kind, value = ident
        for dev in dict.fromkeys(new_devices):
            out[dev].append({
                "id": new_id("fnd"), "kind": "hardware_id_conflict", "severity": "high",
                "reason_code": "CONFLICTING_HARDWARE_ID", "device_id": dev,
                "evidence": {"identifier_kind": kind, "identifier_value": value,
                             "claimed_by": claimed_by, "stage": "issuance"},
                "status": "open", "created_at": now,
            })
    return dict(out)


# --- step 7: bulk writes -------------------------------------------------------------------------


class _BulkWriter:
    """Bulk INSERTs inside the session's transaction, without per-row ORM or Core overhead.

    PostgreSQL (psycopg): ``COPY ... FROM STDIN``. SQLite: the driver's ``executemany`` with one
    compiled INSERT. Other dialects: SQLAlchemy Core executemany. Rows are tuples in database
    form: JSON columns as JSON text, datetimes passed through :meth:`ts`, which applies the
    column type's own bind processing (once per distinct value).
    """

    def __init__(self, session: Session) -> None:
        self._conn: Connection = session.connection()
        self._dialect = self._conn.dialect
        self._mode = (
            "copy" if self._dialect.name == "postgresql" and self._dialect.driver == "psycopg"
            else "sqlite" if self._dialect.name == "sqlite"
            else "core"
        )
        # The dialect-level processor (UTC conversion + SQLite's text format), exactly what the
        # ORM applies to these columns.
        ts_type = Certificate.__table__.c.created_at.type.dialect_impl(self._dialect)
        self._ts_proc = ts_type.bind_processor(self._dialect) if self._mode == "sqlite" else None
        self._ts_cache: dict[dt.datetime, Any] = {}

    def ts(self, value: dt.datetime | None) -> Any:
        if value is None or self._ts_proc is None:
            return value
        out = self._ts_cache.get(value)
        if out is None:
            out = self._ts_cache[value] = self._ts_proc(value)
        return out

    def insert(self, model: type[Base], columns: Sequence[str],
               rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        table = cast(Table, model.__table__)
        quote = self._dialect.identifier_preparer.quote
        target = f"{quote(table.name)} ({', '.join(quote(c) for c in columns)})"
        if self._mode == "copy":
            raw = self._conn.connection.driver_connection
            assert raw is not None
            with raw.cursor() as cur, cur.copy(f"COPY {target} FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        elif self._mode == "sqlite":
            raw = self._conn.connection.driver_connection
            assert raw is not None
            cur = raw.cursor()
            try:
                # Identifiers come from our own models, quoted by the dialect; values are bound.
                sql = f"INSERT INTO {target} VALUES ({', '.join('?' * len(columns))})"  # noqa: S608
                cur.executemany(sql, rows)
            finally:
                cur.close()
        else:
            json_cols = {c for c in columns if isinstance(table.c[c].type, JSON)}
            self._conn.execute(table.insert(), [
                {c: json.loads(v) if c in json_cols else v for c, v in zip(columns, row,
                                                                            strict=True)}
                for row in rows
            ])


def _json(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


_DEVICE_COLS: Final = ("id", "batch_id", "factory_id", "status", "auth_method", "key_origin",
                       "weak_identity", "manifest", "manifest_sha256", "station", "owner",
                       "created_at", "last_seen_at")
_CERT_COLS: Final = ("serial_hex", "ca_id", "kind", "device_id", "subject_ca_id", "der",
                     "public_key_sha256", "not_before", "not_after", "status", "revoked_at",
                     "revocation_reason", "created_at")
_HWID_COLS: Final = ("device_id", "kind", "value", "created_at")
_FINDING_COLS: Final = ("id", "kind", "severity", "reason_code", "device_id", "evidence",
                        "status", "created_at")
_AUDIT_COLS: Final = ("occurred_at", "actor", "actor_role", "action", "target_type",
                      "target_id", "remote_addr", "details")


# --- the service --------------------------------------------------------------------------------


def issue_devices(
    ctx: ServiceContext,
    principal: Principal,
    batch_id: str,
    items: Sequence[IssueRequest],
    *,
    key_origin: str = "device",
) -> IssueResult:
    """Issue one certificate per item into ``batch_id``, all or nothing."""
    require(principal, "admin", "factory")
    if key_origin not in KEY_ORIGINS:
        raise ValueError(f"key_origin must be one of {sorted(KEY_ORIGINS)}")
    if not items:
        raise ValidationError("no devices in the request", code="empty_request")
    n_items = len(items)
    if n_items > ctx.settings.max_bulk_items:
        raise ValidationError(
            f"at most {ctx.settings.max_bulk_items} devices per request, got {n_items}",
            code="too_many_items",
        )
    # Step 1: may this caller issue into this batch at all, and is there room? (fail fast,
    # before any CPU is spent on the request; re-checked in the write transaction)
    with ctx.transaction() as session:
        batch, _, _ = _issuing_context(session, principal, batch_id)
        if batch.issued_count + n_items > batch.planned_size:
            raise _batch_full(batch, n_items)
    # Step 2: validate every line without the database; collect all errors.
    prepared, errors = _prepare_all(items)
    if errors:
        _reject(errors, n_items)

    now = ctx.clock.now()
    with ctx.transaction() as session:
        batch, factory, ca = _issuing_context(session, principal, batch_id)
        # Step 3: conflicts with what the database already holds.
        errors = _database_conflicts(session, prepared)
        if errors:
            _reject(errors, n_items)
        # Step 4: reserve capacity atomically (two processes cannot overfill the batch).
        result = session.execute(
            update(Batch)
            .where(Batch.id == batch.id, Batch.issued_count + n_items <= Batch.planned_size)
            .values(issued_count=Batch.issued_count + n_items)
        )
        if cast(CursorResult[Any], result).rowcount != 1:
            session.refresh(batch)
            raise _batch_full(batch, n_items)
        # Step 5: sign. Serials are fresh CSPRNG values; the primary key refuses any reuse.
        profile = _profile(ctx, ca)
        validity = ctx.settings.device_validity_days
        shard_urls = crl_shard_urls(ctx, ca.id)
        shards = len(shard_urls)
        b_id = batch.id
        signed: list[tuple[_Prepared, x509.Certificate, str]] = []
        for p in prepared:
            serial = pki.new_serial()
            cert = profile.issue(
                p.public_key,
                device_id=p.device_id,
                serial=serial,
                now=now,
                validity_days=validity,
                batch_id=b_id,
                manifest_sha256=p.manifest_sha256,
                crl_url=shard_urls[serial % shards],
            )
            signed.append((p, cert, format(serial, "x")))
        # Step 6: hardware identifiers already claimed by another device become findings.
        findings = _hardware_conflicts(session, prepared, now)
        # Step 7: persist everything in bulk, in this transaction.
        w = _BulkWriter(session)
        ts_now = w.ts(now)
        weak = key_origin != "device"
        actor, role, addr = principal.actor, principal.role, principal.remote_addr
        # Audit details: the constant part serialised once; the rest is hex, ISO dates, ids.
        detail_head = _json({"batch_id": b_id, "factory_id": factory.id, "ca_id": ca.id,
                             "key_origin": key_origin})[:-1]
        station_json: dict[str | None, str] = {}
        device_rows: list[tuple[Any, ...]] = []
        cert_rows: list[tuple[Any, ...]] = []
        hw_rows: list[tuple[Any, ...]] = []
        audit_rows: list[tuple[Any, ...]] = []
        issued: list[IssuedDevice] = []
        for p, cert, serial_hex in signed:
            not_after = cert.not_valid_after_utc
            dev_findings = [f["id"] for f in findings.get(p.device_id, ())]
            manifest_hex = p.manifest_sha256.hex()
            der = cert.public_bytes(serialization.Encoding.DER)
            st = station_json.get(p.station)
            if st is None:
                st = station_json[p.station] = json.dumps(p.station)
            device_rows.append((
                p.device_id, b_id, factory.id, "active", "certificate", key_origin, weak,
                p.manifest_json, manifest_hex, p.station, None, ts_now, None,
            ))
            cert_rows.append((
                serial_hex, ca.id, "device", p.device_id, None,
                der, p.key_fp,
                w.ts(cert.not_valid_before_utc), w.ts(not_after), "good", None, None, ts_now,
            ))
            hw_rows.extend((p.device_id, k, v, ts_now) for k, v in p.identifiers)
            audit_rows.append((
                ts_now, actor, role, "device.manufactured", "device", p.device_id, addr,
                f'{detail_head},"serial":"{serial_hex}","station":{st},"manifest_sha256":'
                f'"{manifest_hex}","not_after":"{not_after.isoformat()}","findings":'
                f'{json.dumps(dev_findings) if dev_findings else "[]"}}}',
            ))
            issued.append(IssuedDevice(
                device_id=p.device_id, serial_hex=serial_hex, certificate_pem=_der_to_pem(der),
                findings=dev_findings,
            ))
        finding_rows = [
            (f["id"], f["kind"], f["severity"], f["reason_code"], f["device_id"],
             _json(f["evidence"]), f["status"], ts_now)
            for fs in findings.values() for f in fs
        ]
        integrity_errors = (IntegrityError, _driver_integrity_error(session))
        try:
            w.insert(Device, _DEVICE_COLS, device_rows)
            w.insert(Certificate, _CERT_COLS, cert_rows)
            w.insert(HardwareIdentifier, _HWID_COLS, hw_rows)
            w.insert(Finding, _FINDING_COLS, finding_rows)
            w.insert(AuditEvent, _AUDIT_COLS, audit_rows)
        except integrity_errors as exc:
            # A concurrent request registered the same caller-chosen device id after step 3.
            raise ConflictError(
                f"a concurrent request stored a conflicting device or serial; nothing was"
                f" issued ({type(exc).__name__})",
                code="concurrent_conflict",
            ) from exc
        chain = _chain_pems(ctx, session, ca.id)
        return IssueResult(batch_id=b_id, devices=issued, chain_pem=chain[:-1],
                           root_pem=chain[-1])


def _driver_integrity_error(session: Session) -> type[Exception]:
    """The DB-API driver's IntegrityError (the bulk writer talks to the driver directly)."""
    dbapi = session.get_bind().dialect.loaded_dbapi
    err = getattr(dbapi, "IntegrityError", None)
    return err if isinstance(err, type) and issubclass(err, Exception) else _NeverRaisedError


class _NeverRaisedError(Exception):
    pass


def _der_to_pem(der: bytes) -> str:
    """PEM text of a DER certificate (used by other services for stored certificates)."""
    b64 = base64.b64encode(der).decode("ascii")
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return "-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n"


# --- server-side key generation ---------------------------------------------------------------


@dataclass(frozen=True)
class GeneratedDevice:
    issued: IssueResult
    key_format: str
    key_bytes: bytes  # encrypted PKCS#8 PEM or PKCS#12; the server keeps no copy


MIN_KEY_PASSPHRASE_CHARS: Final = 12


def issue_with_server_key(
    ctx: ServiceContext,
    principal: Principal,
    batch_id: str,
    *,
    manifest: dict[str, Any],
    passphrase: str,
    key_format: str = "pkcs8",
    device_id: str | None = None,
    station: str | None = None,
) -> GeneratedDevice:
    """For hardware that cannot make a key: generate one, issue, return it once, encrypted.

    The device is marked ``key_origin=server`` / weak identity in the registry. The private key
    exists only in this call's memory and in the returned, passphrase-encrypted blob.
    """
    require(principal, "admin", "factory")
    if key_format not in ("pkcs8", "pkcs12"):
        raise ValidationError("key_format must be 'pkcs8' or 'pkcs12'", code="bad_key_format")
    if not isinstance(passphrase, str) or len(passphrase) < MIN_KEY_PASSPHRASE_CHARS:
        raise ValidationError(
            f"a passphrase of at least {MIN_KEY_PASSPHRASE_CHARS} characters is required to"
            " protect the returned key",
            code="weak_passphrase",
        )
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    result = issue_devices(
        ctx, principal, batch_id,
        [IssueRequest(csr=csr.public_bytes(serialization.Encoding.DER), manifest=manifest,
                      device_id=device_id, station=station)],
        key_origin="server",
    )
    enc = serialization.BestAvailableEncryption(passphrase.encode())
    if key_format == "pkcs8":
        blob = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    else:
        cert = x509.load_pem_x509_certificate(result.devices[0].certificate_pem.encode())
        cas = [x509.load_pem_x509_certificate(c.encode()) for c in result.chain_pem]
        blob = pkcs12.serialize_key_and_certificates(
            result.devices[0].device_id.encode(), key, cert, cas, enc
        )
    return GeneratedDevice(issued=result, key_format=key_format, key_bytes=blob)
