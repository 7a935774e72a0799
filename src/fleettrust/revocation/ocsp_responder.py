"""The OCSP responder: delegated responder certificates, a pre-signed response cache, refresh.

One :class:`OcspResponder` per server process. It answers raw request bytes with ready-made
HTTP responses (:class:`CachedResponse`: DER body plus RFC 5019 §6 headers):

* **Hot path** (:meth:`OcspResponder.lookup_post` / :meth:`~OcspResponder.lookup_get`): the
  request bytes (POST body, or the base64 path segment of a GET) are looked up in a dict of
  already-seen requests; a hit returns the pre-signed response as is. No parsing, no database,
  no signing. Only nonce-less one-certificate requests are remembered this way (a request with a
  nonce is unique, so remembering it would only fill memory).
* **Slow path** (:meth:`OcspResponder.resolve` / :meth:`~OcspResponder.resolve_get`, to be run
  in a worker thread): parse the request, identify the issuer by (hash algorithm,
  issuerNameHash, issuerKeyHash), read the certificate's row (``certificates``: issued by that
  CA or not, good / revoked / hold), sign a response with the CA's delegated responder key and
  cache it under (CA, hash algorithm, serial).

Statuses: ``good``; ``revoked`` with revocation time and reason (a certificate on hold is
``revoked`` with reason certificateHold, RFC 6960 §2.2); ``unknown`` when that CA never issued
that serial. ``unauthorized`` when the issuer is not one of our CAs whose key the platform holds
(the offline root, a factory CA kept in the factory's own token), ``malformedRequest`` for
anything unreadable (never an HTTP 500), ``tryLater`` when the database is unreachable.

Several certificates in one request (RFC 6960 allows it, RFC 5019 clients send one) are all
answered, in one response signed on the spot and not cached. Request nonces are not echoed
(RFC 5019 §4 allows it; responses are pre-signed), see docs/adr/0009-ocsp-responder.md.

Freshness. Responses carry ``thisUpdate`` = signing time and ``nextUpdate`` = ``thisUpdate`` +
``validity`` (1 h). A background thread (:meth:`OcspResponder.start`):

* syncs a :class:`~fleettrust.revocation.index.RevocationIndex` every ``sync_interval``
  (0.25 s) and, through its subscription, *invalidates at once* every cached response of a
  serial the log changed (the next request re-reads the database and re-signs), then re-signs
  those responses in the background. A revocation made through another process on the same
  database is therefore served within about ``sync_interval`` plus one signature.
* re-signs responses at half of their validity if they were asked for since they were signed,
  and drops them otherwise (the cache holds what clients ask for, bounded by ``max_entries``);
  ``unknown`` answers are dropped after ``unknown_ttl`` (a serial may be issued later).

Race freedom: a cache slot is registered *before* the database is read; the invalidation bumps
the slot's version, and a signature is stored only if the version did not move while it was
made. An event that was handled before the slot existed was committed before the read.

Delegated responder certificates (RFC 6960 §4.2.2.2): one per issuing CA, made by
:func:`ensure_responder_credential` with :func:`fleettrust.pki.issue_ocsp_responder_certificate`
(id-kp-OCSPSigning, id-pkix-ocsp-nocheck, digitalSignature, 30 days), its P-256 key an encrypted
file in the file key store (whatever store the CAs use), recorded as a ``ServerCredential`` with
purpose ``ocsp:<ca id>`` and a ``certificates`` row of kind ``ocsp``. The first process that needs
one creates it while holding the CA row lock (``SELECT … FOR UPDATE`` on PostgreSQL; SQLite's
``BEGIN IMMEDIATE`` serialises writers), so concurrent processes converge on one. It is rotated
``rotate_before`` (7 days) before it expires; every process re-reads the current one every
``credential_check_interval`` and signs new responses with the newest.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import email.utils
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from fleettrust import pki
from fleettrust.errors import FleetTrustError
from fleettrust.ids import new_id
from fleettrust.revocation import ocsp
from fleettrust.services import audit
from fleettrust.services.auth import SYSTEM
from fleettrust.services.context import ServiceContext, read_keystore_passphrase
from fleettrust.signing.base import Signer
from fleettrust.signing.filekeys import FileKeyStore
from fleettrust.storage.models import Certificate, CertificateAuthority, ServerCredential

log = logging.getLogger("fleettrust.revocation.ocsp")

CONTENT_TYPE: Final = b"application/ocsp-response"
PURPOSE_PREFIX: Final = "ocsp:"
DEFAULT_VALIDITY: Final = dt.timedelta(hours=1)
DEFAULT_RESPONDER_VALIDITY_DAYS: Final = 30
DEFAULT_ROTATE_BEFORE: Final = dt.timedelta(days=7)
_SERIAL_LIMIT: Final = 1 << 159  # fleettrust serials are 1 <= s < 2**159 (pki.serials)

#: Scheduling clock (tests replace it to move time).
_monotonic: Callable[[], float] = time.monotonic


# --- what the HTTP layer sends ------------------------------------------------------------------


def _http_date(value: dt.datetime) -> bytes:
    return email.utils.formatdate(value.timestamp(), usegmt=True).encode()


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """A complete HTTP answer: DER ``OCSPResponse`` and its headers (ASGI form).

    ``stale_at`` is a ``time.monotonic()`` deadline after which the hot path no longer serves
    it (the background refresh replaces it long before). ``status`` is ``good``, ``revoked``,
    ``unknown`` or the name of a non-successful response status (``malformedRequest`` …).
    """

    body: bytes
    headers: list[tuple[bytes, bytes]]
    etag: bytes
    stale_at: float
    status: str
    this_update: dt.datetime | None = None
    next_update: dt.datetime | None = None
    #: Ready-made ASGI messages for a 200 answer; shared between requests, never mutate them.
    start_message: dict[str, Any] = field(init=False, repr=False, compare=False)
    body_message: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "start_message", {
            "type": "http.response.start", "status": 200, "headers": self.headers})
        object.__setattr__(self, "body_message", {
            "type": "http.response.body", "body": self.body})


def _error(status: ocsp.ResponseStatus, name: str) -> CachedResponse:
    body = ocsp.error_response(status)
    return CachedResponse(
        body=body,
        headers=[(b"content-type", CONTENT_TYPE), (b"content-length", str(len(body)).encode()),
                 (b"cache-control", b"no-store")],
        etag=b"",
        stale_at=float("inf"),
        status=name,
    )


MALFORMED: Final = _error(ocsp.ResponseStatus.MALFORMED_REQUEST, "malformedRequest")
UNAUTHORIZED: Final = _error(ocsp.ResponseStatus.UNAUTHORIZED, "unauthorized")
TRY_LATER: Final = _error(ocsp.ResponseStatus.TRY_LATER, "tryLater")
INTERNAL_ERROR: Final = _error(ocsp.ResponseStatus.INTERNAL_ERROR, "internalError")


# --- delegated responder credentials -----------------------------------------------------------


@dataclass(frozen=True)
class ResponderCredential:
    """The delegated responder certificate of one CA and the signer of its key."""

    ca_id: str
    credential_id: str
    signer: Signer
    certificate_der: bytes
    key_hash: bytes  # ResponderID byKey
    not_after: dt.datetime


def _purpose(ca_id: str) -> str:
    return f"{PURPOSE_PREFIX}{ca_id}"


def _newest(session: Any, ca_id: str) -> ServerCredential | None:
    row: ServerCredential | None = session.scalars(
        select(ServerCredential)
        .where(ServerCredential.purpose == _purpose(ca_id))
        .order_by(ServerCredential.not_after.desc(), ServerCredential.created_at.desc(),
                  ServerCredential.id.desc())
    ).first()
    return row


def _needs_new(row: ServerCredential | None, ca: CertificateAuthority, now: dt.datetime,
               rotate_before: dt.timedelta) -> bool:
    if row is None or row.not_after <= now:
        return True
    if row.not_after - now >= rotate_before:
        return False
    # Due for rotation, unless the CA itself ends first (a new certificate could not outlive
    # the current one: issuing would repeat on every check).
    return ca.not_after is None or ca.not_after > row.not_after + dt.timedelta(hours=1)


def ensure_responder_credential(
    ctx: ServiceContext,
    ca_id: str,
    *,
    key_store: FileKeyStore | None = None,
    rotate_before: dt.timedelta = DEFAULT_ROTATE_BEFORE,
    validity_days: int = DEFAULT_RESPONDER_VALIDITY_DAYS,
) -> ResponderCredential | None:
    """The current delegated responder credential of CA ``ca_id``, created or rotated if due.

    Returns ``None`` when there is none and none can be made: the CA's key is not in the
    platform's key store (offline root, factory token) or the CA is no longer active. Safe to
    call from several processes at once: creation holds the CA row lock and re-checks, so they
    all end up with the same (newest) credential.
    """
    store = key_store or FileKeyStore(ctx.settings.keys_dir, read_keystore_passphrase(ctx.settings))
    now = ctx.clock.now()
    with ctx.sessions() as session:
        ca = session.get(CertificateAuthority, ca_id)
        if ca is None:
            return None
        row = _newest(session, ca_id)
        if row is not None and not _needs_new(row, ca, now, rotate_before):
            return _load_credential(store, ca_id, row)
    can_issue = (ca.status == "active" and ca.key_location == "platform"
                 and ca.key_id is not None and ca.certificate_der is not None)
    if not can_issue:
        return _load_credential(store, ca_id, row) if row is not None and row.not_after > now \
            else None
    created_key: str | None = None
    try:
        with ctx.transaction() as session:
            # The CA row lock serialises creators across processes (SQLite: BEGIN IMMEDIATE).
            ca = session.scalars(
                select(CertificateAuthority).where(CertificateAuthority.id == ca_id)
                .with_for_update()
            ).one()
            row = _newest(session, ca_id)
            if row is not None and not _needs_new(row, ca, now, rotate_before):
                return _load_credential(store, ca_id, row)
            if ca.key_id is None or ca.certificate_der is None or ca.status != "active":
                # the CA changed under us (revoked meanwhile): keep what is still valid
                if row is not None and row.not_after > now:
                    return _load_credential(store, ca_id, row)
                return None
            signer = store.generate(f"ocsp-{ca_id}")
            created_key = signer.key_id
            serial = pki.new_serial()
            cert = pki.issue_ocsp_responder_certificate(
                ctx.signer(ca.key_id), x509.load_der_x509_certificate(ca.certificate_der),
                signer.public_key(), common_name=f"OCSP responder {ca_id}",
                organization=ctx.settings.organization, serial=serial, now=now,
                validity_days=validity_days,
            )
            der = cert.public_bytes(serialization.Encoding.DER)
            row = ServerCredential(
                id=new_id("srv"), purpose=_purpose(ca_id), key_id=signer.key_id,
                certificate_der=der, names={"ca_id": ca_id, "serial": format(serial, "x")},
                not_after=cert.not_valid_after_utc, created_at=now,
            )
            session.add(row)
            session.add(Certificate(
                serial_hex=format(serial, "x"), ca_id=ca_id, kind="ocsp", device_id=None,
                subject_ca_id=None, der=der,
                public_key_sha256=pki.public_key_fingerprint(signer.public_key()),
                not_before=cert.not_valid_before_utc, not_after=cert.not_valid_after_utc,
                status="good", revoked_at=None, revocation_reason=None, created_at=now,
            ))
            audit.record(session, SYSTEM, "ocsp.responder_certificate", "ca", ca_id, now,
                         serial=format(serial, "x"), credential_id=row.id,
                         not_after=cert.not_valid_after_utc.isoformat())
            session.flush()
            created = ResponderCredential(
                ca_id=ca_id, credential_id=row.id, signer=signer, certificate_der=der,
                key_hash=ocsp.responder_key_hash(cert), not_after=cert.not_valid_after_utc,
            )
        log.info("issued OCSP responder certificate %s for CA %s", format(serial, "x"), ca_id)
        return created
    except BaseException:
        if created_key is not None:
            with contextlib.suppress(FleetTrustError, OSError):
                store.delete(created_key)
        raise


def _load_credential(store: FileKeyStore, ca_id: str, row: ServerCredential) -> ResponderCredential:
    cert = x509.load_der_x509_certificate(row.certificate_der)
    return ResponderCredential(
        ca_id=ca_id, credential_id=row.id, signer=store.load(row.key_id),
        certificate_der=row.certificate_der, key_hash=ocsp.responder_key_hash(cert),
        not_after=row.not_after,
    )


# --- the responder ------------------------------------------------------------------------------


class RevocationSource(Protocol):
    """What the responder needs of :class:`fleettrust.revocation.index.RevocationIndex`."""

    def sync(self) -> list[Any]: ...

    def subscribe(self, callback: Callable[[list[Any]], None]) -> None: ...


@dataclass(frozen=True)
class _Issuer:
    ca_id: str
    status: str
    certificate: x509.Certificate


@dataclass(eq=False)
class _Slot:
    """One cached answer: (CA, hash algorithm, serial) -> current signed response."""

    ca_id: str
    cert_id: ocsp.CertId
    current: CachedResponse | None = None
    version: int = 0  # bumped by every revocation event for this serial
    hit: bool = False  # asked for since it was last signed
    signed_mono: float = 0.0
    aliases_post: list[bytes] = field(default_factory=list)
    aliases_get: list[str] = field(default_factory=list)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.ca_id, self.cert_id.hash_algorithm, self.cert_id.serial)


_MAX_ALIASES: Final = 8


class OcspResponder:
    """Answers OCSP requests for every CA whose key the platform holds. Thread-safe.

    Call :meth:`start` to run the background sync/refresh thread and :meth:`close` to stop it.
    ``index`` defaults to a new :class:`~fleettrust.revocation.index.RevocationIndex`; with
    ``sync_index`` (default) the responder's thread syncs it, otherwise it relies on whoever
    else follows that index to call its subscribers.
    """

    def __init__(
        self,
        ctx: ServiceContext,
        *,
        index: RevocationSource | None = None,
        sync_index: bool = True,
        validity: dt.timedelta = DEFAULT_VALIDITY,
        refresh_fraction: float = 0.5,
        unknown_ttl: float = 60.0,
        http_max_age: int = 60,
        max_entries: int = 100_000,
        sync_interval: float = 0.25,
        responder_validity_days: int = DEFAULT_RESPONDER_VALIDITY_DAYS,
        rotate_before: dt.timedelta = DEFAULT_ROTATE_BEFORE,
        credential_check_interval: float = 60.0,
    ) -> None:
        if not dt.timedelta(minutes=1) <= validity <= dt.timedelta(days=7):
            raise ValueError("validity must be between 1 minute and 7 days")
        if not 0.1 <= refresh_fraction <= 0.9:
            raise ValueError("refresh_fraction must be between 0.1 and 0.9")
        self.ctx = ctx
        if index is None:
            from fleettrust.revocation.index import RevocationIndex

            index = RevocationIndex(ctx)
        self.index: RevocationSource = index
        self._sync_index = sync_index
        self.validity = validity
        self._refresh_after = validity.total_seconds() * refresh_fraction
        self._unknown_ttl = unknown_ttl
        # Never promise HTTP caches more than what is left when the response is refreshed.
        self._max_age = max(0, min(http_max_age, int(validity.total_seconds()
                                                       - self._refresh_after) - 60))
        self._max_entries = max_entries
        self._sync_interval = sync_interval
        self._responder_validity_days = responder_validity_days
        self._rotate_before = rotate_before
        self._credential_check_interval = credential_check_interval
        self._store = FileKeyStore(ctx.settings.keys_dir, read_keystore_passphrase(ctx.settings))

        self._lock = threading.RLock()
        self._cred_lock = threading.Lock()
        # hot-path dicts: read without the lock (single dict operations are atomic)
        self._by_post: dict[bytes, _Slot] = {}
        self._by_get: dict[str, _Slot] = {}
        self._slots: dict[tuple[str, str, int], _Slot] = {}
        self._issuers: dict[tuple[str, bytes, bytes], _Issuer] = {}
        self._issuer_count = -1
        self._credentials: dict[str, ResponderCredential] = {}
        self._refresh_q: collections.deque[tuple[float, _Slot, int]] = collections.deque()
        self._unknown_q: collections.deque[tuple[float, _Slot, int]] = collections.deque()
        self._resign_q: collections.deque[_Slot] = collections.deque()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.stats: collections.Counter[str] = collections.Counter()
        self.index.subscribe(self._on_events)
        self._load_issuers()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> OcspResponder:
        """Start the background thread (index sync, invalidation re-signing, refresh)."""
        with self._lock:
            if self._thread is None and not self._closed:
                if self._sync_index:
                    self._safe(self.index.sync)
                self._thread = threading.Thread(target=self._run, name="ocsp-responder",
                                                daemon=True)
                self._thread.start()
        return self

    def close(self) -> None:
        self._closed = True
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def __enter__(self) -> OcspResponder:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- hot path --------------------------------------------------------------------------

    def lookup_post(self, body: bytes) -> CachedResponse | None:
        """The pre-signed answer to exactly these request bytes, if cached and fresh."""
        slot = self._by_post.get(body)
        if slot is not None:
            resp = slot.current
            if resp is not None and resp.stale_at > _monotonic():
                slot.hit = True
                return resp
        return None

    def lookup_get(self, encoded: str) -> CachedResponse | None:
        """Same as :meth:`lookup_post` for the base64 path segment of a GET request."""
        slot = self._by_get.get(encoded)
        if slot is not None:
            resp = slot.current
            if resp is not None and resp.stale_at > _monotonic():
                slot.hit = True
                return resp
        return None

    # --- slow path -------------------------------------------------------------------------

    def resolve(self, der: bytes) -> CachedResponse:
        """Answer a DER request (POST body). Blocking (database, signing): run in a thread."""
        return self._answer(der, post_key=bytes(der), get_key=None)

    def resolve_get(self, encoded: str) -> CachedResponse:
        """Answer a GET request given its path segment after ``/ocsp/``."""
        try:
            der = ocsp.decode_get_path(encoded)
        except ocsp.MalformedRequestError:
            self.stats["malformedRequest"] += 1
            return MALFORMED
        return self._answer(der, post_key=None, get_key=encoded)

    def _answer(self, der: bytes, *, post_key: bytes | None, get_key: str | None) -> CachedResponse:
        try:
            request = ocsp.parse_request(der)
        except ocsp.MalformedRequestError as exc:
            log.debug("malformed OCSP request: %s", exc)
            self.stats["malformedRequest"] += 1
            return MALFORMED
        try:
            issuers = [self._issuer_for(cid) for cid in request.cert_ids]
            if any(i is None for i in issuers):
                self.stats["unauthorized"] += 1
                return UNAUTHORIZED
            known = [i for i in issuers if i is not None]
            if len(request.cert_ids) > 1:
                return self._sign_many(known, request.cert_ids)
            slot = self._slot(known[0], request.cert_ids[0])
            resp = slot.current
            if resp is None or resp.stale_at <= _monotonic():
                resp = self._fill(slot)
                if resp.status == "unauthorized":
                    return resp
            else:
                slot.hit = True
            if request.nonce is None:
                self._alias(slot, post_key, get_key)
            return resp
        except SQLAlchemyError:
            log.exception("OCSP: database error")
            self.stats["tryLater"] += 1
            return TRY_LATER
        except Exception:
            log.exception("OCSP: internal error")
            self.stats["internalError"] += 1
            return INTERNAL_ERROR

    def _alias(self, slot: _Slot, post_key: bytes | None, get_key: str | None) -> None:
        with self._lock:
            if self._slots.get(slot.key) is not slot:
                return  # evicted meanwhile
            if post_key is not None and post_key not in self._by_post \
                    and len(slot.aliases_post) < _MAX_ALIASES:
                slot.aliases_post.append(post_key)
                self._by_post[post_key] = slot
            if get_key is not None and get_key not in self._by_get \
                    and len(slot.aliases_get) < _MAX_ALIASES:
                slot.aliases_get.append(get_key)
                self._by_get[get_key] = slot

    def _slot(self, issuer: _Issuer, cert_id: ocsp.CertId) -> _Slot:
        key = (issuer.ca_id, cert_id.hash_algorithm, cert_id.serial)
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                while len(self._slots) >= self._max_entries:
                    self._evict(next(iter(self._slots.values())))
                slot = _Slot(ca_id=issuer.ca_id, cert_id=cert_id)
                self._slots[key] = slot
            return slot

    def _evict(self, slot: _Slot) -> None:
        with self._lock:
            if self._slots.get(slot.key) is slot:
                del self._slots[slot.key]
            for p in slot.aliases_post:
                if self._by_post.get(p) is slot:
                    del self._by_post[p]
            for g in slot.aliases_get:
                if self._by_get.get(g) is slot:
                    del self._by_get[g]
            slot.aliases_post = []
            slot.aliases_get = []

    def _fill(self, slot: _Slot) -> CachedResponse:
        """Read the status, sign, store in ``slot`` unless an event for it came meanwhile."""
        for _ in range(20):
            version = slot.version
            resp = self._sign_one(slot.ca_id, slot.cert_id)
            if resp.status not in ("good", "revoked", "unknown"):
                return resp  # no responder credential: nothing to cache
            with self._lock:
                if slot.version == version:
                    slot.current = resp
                    slot.hit = False
                    slot.signed_mono = _monotonic()
                    if resp.status == "unknown":
                        self._unknown_q.append((slot.signed_mono + self._unknown_ttl, slot,
                                                version))
                    elif resp.status in ("good", "revoked"):
                        self._refresh_q.append((slot.signed_mono + self._refresh_after, slot,
                                                version))
                    self.stats["signed"] += 1
                    return resp
        return resp  # the serial keeps changing: answer with the latest reading, do not cache

    def _status(self, ca_id: str, serial: int) -> tuple[str, dt.datetime | None, str | None]:
        """(good|revoked|unknown, revocation time, reason name) from the certificate's row."""
        if not 0 < serial < _SERIAL_LIMIT:
            return "unknown", None, None
        with self.ctx.sessions() as session:
            row = session.execute(
                select(Certificate.ca_id, Certificate.status, Certificate.revoked_at,
                       Certificate.revocation_reason)
                .where(Certificate.serial_hex == format(serial, "x"))
            ).first()
        if row is None or row.ca_id != ca_id:
            return "unknown", None, None
        if row.status == "good":
            return "good", None, None
        if row.status == "hold":
            return "revoked", row.revoked_at, "certificateHold"
        return "revoked", row.revoked_at, row.revocation_reason

    def _single(self, ca_id: str, cert_id: ocsp.CertId, now: dt.datetime,
                next_update: dt.datetime) -> ocsp.SingleResponse:
        status, revoked_at, reason = self._status(ca_id, cert_id.serial)
        if status == "revoked" and revoked_at is None:  # defensive: rows always carry it
            revoked_at = now
        return ocsp.SingleResponse(
            cert_id=cert_id, status="good" if status == "good" else
            "revoked" if status == "revoked" else "unknown",
            this_update=now, next_update=next_update, revoked_at=revoked_at,
            reason=ocsp.reason_flag(reason) if status == "revoked" else None,
        )

    def _now(self) -> dt.datetime:
        return self.ctx.clock.now().replace(microsecond=0)

    def _sign_one(self, ca_id: str, cert_id: ocsp.CertId) -> CachedResponse:
        cred = self._credential(ca_id)
        if cred is None:
            return UNAUTHORIZED
        now = self._now()
        next_update = min(now + self.validity, cred.not_after)
        single = self._single(ca_id, cert_id, now, next_update)
        return self._package([single], cred, now, next_update, cache=True)

    def _sign_many(self, issuers: list[_Issuer], cert_ids: Iterable[ocsp.CertId]) -> CachedResponse:
        """Several certificates: one response signed now with the first issuer's responder
        certificate, if every certificate has that issuer (else unauthorized: a delegated
        responder speaks only for its own CA)."""
        ca_ids = {i.ca_id for i in issuers}
        if len(ca_ids) != 1:
            self.stats["unauthorized"] += 1
            return UNAUTHORIZED
        ca_id = issuers[0].ca_id
        cred = self._credential(ca_id)
        if cred is None:
            return UNAUTHORIZED
        now = self._now()
        next_update = min(now + self.validity, cred.not_after)
        singles = [self._single(ca_id, c, now, next_update) for c in cert_ids]
        self.stats["signed_multi"] += 1
        return self._package(singles, cred, now, next_update, cache=False)

    def _package(self, singles: list[ocsp.SingleResponse], cred: ResponderCredential,
                 now: dt.datetime, next_update: dt.datetime, *, cache: bool) -> CachedResponse:
        body = ocsp.build_response(
            singles, signer=cred.signer, responder_cert_der=cred.certificate_der,
            responder_key_id=cred.key_hash, produced_at=now,
        )
        status = singles[0].status if len(singles) == 1 else "multiple"
        etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
        if cache and status != "unknown":
            cache_control = (f"max-age={self._max_age}, public, no-transform, "
                             "must-revalidate").encode()
        else:
            cache_control = b"max-age=0, no-cache"
        headers = [
            (b"content-type", CONTENT_TYPE),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", cache_control),
            (b"expires", _http_date(next_update)),
            (b"last-modified", _http_date(now)),
            (b"etag", etag),
        ]
        lifetime = (self._unknown_ttl if status == "unknown"
                    else 0.9 * (next_update - now).total_seconds())
        return CachedResponse(body=body, headers=headers, etag=etag,
                              stale_at=_monotonic() + max(lifetime, 1.0), status=status,
                              this_update=now, next_update=next_update)

    # --- issuers and credentials -----------------------------------------------------------

    def _issuer_query(self) -> Any:
        return (select(CertificateAuthority.id, CertificateAuthority.status,
                       CertificateAuthority.certificate_der)
                .where(CertificateAuthority.certificate_der.is_not(None),
                       CertificateAuthority.key_location == "platform",
                       CertificateAuthority.key_id.is_not(None)))

    def _load_issuers(self) -> None:
        with self.ctx.sessions() as session:
            rows = session.execute(self._issuer_query()).all()
        issuers: dict[tuple[str, bytes, bytes], _Issuer] = {}
        for ca_id, status, der in rows:
            if der is None:
                continue
            cert = x509.load_der_x509_certificate(der)
            issuer = _Issuer(ca_id=ca_id, status=status, certificate=cert)
            for alg in ocsp.HASH_ALGORITHMS:
                name_hash, key_hash = ocsp.issuer_hashes(cert, alg)
                issuers[(alg, name_hash, key_hash)] = issuer
        self._issuers = issuers
        self._issuer_count = len(rows)

    def _issuer_for(self, cert_id: ocsp.CertId) -> _Issuer | None:
        key = (cert_id.hash_algorithm, cert_id.issuer_name_hash, cert_id.issuer_key_hash)
        issuer = self._issuers.get(key)
        if issuer is None and cert_id.hash_algorithm in ocsp.HASH_ALGORITHMS:
            # Maybe a CA created since (by this or another process): one cheap count decides
            # whether to reload (foreign issuers cost this query, never a reload).
            with self.ctx.sessions() as session:
                count = session.scalar(
                    select(func.count()).select_from(self._issuer_query().subquery()))
            if count != self._issuer_count:
                self._load_issuers()
                issuer = self._issuers.get(key)
        return issuer

    def _credential(self, ca_id: str) -> ResponderCredential | None:
        cred = self._credentials.get(ca_id)
        if cred is not None and cred.not_after > self.ctx.clock.now():
            return cred
        with self._cred_lock:
            cred = self._credentials.get(ca_id)
            if cred is not None and cred.not_after > self.ctx.clock.now():
                return cred
            cred = ensure_responder_credential(
                self.ctx, ca_id, key_store=self._store, rotate_before=self._rotate_before,
                validity_days=self._responder_validity_days)
            if cred is not None:
                self._credentials[ca_id] = cred
            return cred

    def credential(self, ca_id: str) -> ResponderCredential | None:
        """The delegated responder credential this process signs ``ca_id``'s answers with."""
        return self._credential(ca_id)

    def _check_credentials(self) -> None:
        """Rotate due credentials and adopt the newest one another process made."""
        for ca_id in list(self._credentials):
            with self._cred_lock:
                cred = ensure_responder_credential(
                    self.ctx, ca_id, key_store=self._store, rotate_before=self._rotate_before,
                    validity_days=self._responder_validity_days)
                if cred is None:
                    self._credentials.pop(ca_id, None)
                    continue
                old = self._credentials.get(ca_id)
                self._credentials[ca_id] = cred
            if old is None or old.credential_id != cred.credential_id:
                log.info("OCSP responder of CA %s now signs with credential %s",
                         ca_id, cred.credential_id)
                with self._lock:
                    stale = [s for s in self._slots.values() if s.ca_id == ca_id]
                self._resign_q.extend(stale)  # old answers stay valid; re-sign soon anyway

    # --- invalidation and refresh ----------------------------------------------------------

    def _on_events(self, events: list[Any]) -> None:
        """Index subscriber: a serial's state changed somewhere. Invalidate its answers now."""
        if self._closed:
            return
        touched: list[_Slot] = []
        with self._lock:
            slots = self._slots
            for event in events:
                try:
                    serial = int(event.serial_hex, 16)
                except (AttributeError, TypeError, ValueError):
                    continue
                ca_id = event.ca_id
                for alg in ocsp.HASH_ALGORITHMS:
                    slot = slots.get((ca_id, alg, serial))
                    if slot is not None:
                        slot.version += 1
                        slot.current = None
                        touched.append(slot)
        if touched:
            self.stats["invalidated"] += len(touched)
            self._resign_q.extend(touched)

    def _safe(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception:
            log.exception("OCSP responder background step %s failed", getattr(fn, "__name__", fn))

    def _resign_pending(self, budget_s: float = 0.25) -> None:
        deadline = _monotonic() + budget_s
        while self._resign_q and _monotonic() < deadline:
            slot = self._resign_q.popleft()
            if self._slots.get(slot.key) is slot:
                self._fill(slot)

    def _refresh_due(self, budget_s: float = 0.25) -> None:
        now = _monotonic()
        deadline = now + budget_s
        for queue, resign in ((self._unknown_q, False), (self._refresh_q, True)):
            while queue and queue[0][0] <= now and _monotonic() < deadline:
                _due, slot, version = queue.popleft()
                if slot.version != version or slot.current is None \
                        or self._slots.get(slot.key) is not slot:
                    continue  # re-signed or evicted since
                if slot.signed_mono + (self._refresh_after if resign else self._unknown_ttl) \
                        > now + 0.001:
                    continue  # a newer signature queued its own entry
                if resign and slot.hit:
                    self._fill(slot)
                else:
                    self._evict(slot)
                    self.stats["evicted"] += 1

    def refresh_now(self) -> None:
        """Run one background step in the caller's thread (tests, single-threaded use)."""
        if self._sync_index:
            self.index.sync()
        self._resign_pending(budget_s=60)
        self._refresh_due(budget_s=60)

    def _run(self) -> None:
        last_cred_check = _monotonic()
        last_issuer_load = _monotonic()
        while not self._stop.is_set():
            if self._sync_index:
                self._safe(self.index.sync)
            self._safe(self._resign_pending)
            self._safe(self._refresh_due)
            mono = _monotonic()
            if mono - last_cred_check >= self._credential_check_interval:
                last_cred_check = mono
                self._safe(self._check_credentials)
            if mono - last_issuer_load >= 60.0:
                last_issuer_load = mono
                self._safe(self._load_issuers)
            self._stop.wait(0.0 if self._resign_q else self._sync_interval)

    # --- introspection (tests, metrics) ----------------------------------------------------

    def cache_size(self) -> int:
        return len(self._slots)


__all__ = [
    "CONTENT_TYPE",
    "INTERNAL_ERROR",
    "MALFORMED",
    "TRY_LATER",
    "UNAUTHORIZED",
    "CachedResponse",
    "OcspResponder",
    "ResponderCredential",
    "RevocationSource",
    "ensure_responder_credential",
]
