"""CRL publication: numbers, signing, storage, regeneration (on every revocation, before
nextUpdate, on demand).

For each issuing CA whose key is in the platform key store the publisher keeps, in
``crl_documents``, one complete CRL per shard and one CA-level complete CRL, each with its delta
CRL and the *anchor* (the complete CRL the delta is relative to). Profiles: :mod:`.crl`.

Numbering: one number sequence per (CA, shard) family (shard ``-1`` = CA-level), shared by the
complete and delta CRLs of that scope (§5.2.3). The counter is the ``crl_state`` row of the
family; a publication locks the CA's rows (``SELECT ... FOR UPDATE`` on PostgreSQL; SQLite
serialises writers with ``BEGIN IMMEDIATE``), reads the revocations *after* taking the lock and
writes complete = n+1, delta = n+2. Two processes regenerating at once therefore publish one
after the other, each with higher numbers and content at least as new: numbers never decrease
and never repeat.

When: :meth:`CrlPublisher.document` regenerates a CA whose CRLs are stale before answering —
a newer ``revocations`` row of that CA, a newer revocation operation, or 2/3 of the validity
elapsed — so a server that runs no background task still serves current CRLs. The background
:meth:`CrlPublisher.run` regenerates affected CAs right after each index sync that saw a
revocation (debounced), re-anchors CRLs at 2/3 of their validity, and finishes pending
revocation operations (``services.revocation.materialize_pending``) left by a crashed process.

Deltas: a regeneration triggered by a change keeps the anchor, so the delta lists everything
since the anchor; a scheduled regeneration (2/3 of the validity), or a delta that would list
more than half as many entries as the complete CRL (a mass revocation), makes the new complete
CRL the anchor. A client holding any complete CRL numbered >= the anchor can apply the delta.

The root's CRL is signed offline (``fleettrust ca root-crl``) and uploaded
(:meth:`CrlPublisher.store_uploaded`); it is never regenerated here. CAs whose key the platform
does not hold (factories with their own token) get no CRL from the platform.

Not here: HTTP (``api.crl_routes``), CRL building (``revocation.crl``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from sqlalchemy import bindparam, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fleettrust.errors import ConflictError, NotFoundError, ValidationError
from fleettrust.revocation import crl as crlmod
from fleettrust.revocation import rawread
from fleettrust.revocation.index import RevocationEvent, RevocationIndex, RevocationRule
from fleettrust.revocation.models import CrlDocument, RevocationOperation
from fleettrust.services import revocation as revsvc
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import (
    Batch,
    Certificate,
    CertificateAuthority,
    CrlState,
    Revocation,
)

log = logging.getLogger("fleettrust.revocation.crl")

CA_LEVEL: Final = -1
DEFAULT_VALIDITY: Final = dt.timedelta(hours=24)
REFRESH_AT: Final = 2 / 3  # regenerate (and re-anchor) after this fraction of the validity
DEBOUNCE_S: Final = 0.1
CHECK_INTERVAL_S: Final = 1.0
MAX_AGE_S: Final = 60  # HTTP caching: at most this, and never beyond nextUpdate


@dataclass(frozen=True)
class PublishedCrl:
    ca_id: str
    shard: int  # -1: CA-level
    kind: str  # full | delta
    crl_number: int
    this_update: dt.datetime
    next_update: dt.datetime
    der: bytes

    @property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.der).hexdigest()[:32] + '"'


def crl_urls(base_url: str, ca_id: str) -> dict[str, str]:
    """URL templates of one CA's CRLs (``{shard}`` to fill in)."""
    base = base_url.rstrip("/")
    return {
        "ca_level": f"{base}/crl/{ca_id}.crl",
        "ca_level_delta": f"{base}/crl/{ca_id}/delta.crl",
        "shard": f"{base}/crl/{ca_id}/{{shard}}.crl",
        "shard_delta": f"{base}/crl/{ca_id}/{{shard}}-delta.crl",
    }


def full_url(base_url: str, ca_id: str, shard: int) -> str:
    u = crl_urls(base_url, ca_id)
    return u["ca_level"] if shard == CA_LEVEL else u["shard"].format(shard=shard)


def delta_url(base_url: str, ca_id: str, shard: int) -> str:
    u = crl_urls(base_url, ca_id)
    return u["ca_level_delta"] if shard == CA_LEVEL else u["shard_delta"].format(shard=shard)


def _doc(row: CrlDocument) -> PublishedCrl:
    return PublishedCrl(row.ca_id, row.shard, row.kind, row.crl_number, row.this_update,
                        row.next_update, row.der)


class CrlPublisher:
    """Publishes and serves the CRLs of one database (one per process is enough)."""

    def __init__(self, ctx: ServiceContext, *, validity: dt.timedelta = DEFAULT_VALIDITY,
                 recheck_s: float = 0.1) -> None:
        if validity <= dt.timedelta(minutes=1):
            raise ValueError("CRL validity must exceed one minute")
        self.ctx = ctx
        self.validity = validity
        self.recheck_s = recheck_s
        self._caches: dict[str, crlmod.EntryCache] = {}
        self._anchors: dict[tuple[str, int, int], dict[int, crlmod.CrlEntry]] = {}
        self._served: dict[tuple[str, int, str], tuple[float, PublishedCrl]] = {}
        self._digests: dict[str, tuple[int, int]] = {}  # CA -> (CA-level number, entries hash)
        self._seen: dict[str, tuple[int, int]] = {}  # CA -> (log seq, op seq) known covered
        self._lock = threading.Lock()  # one publication at a time in this process
        self._dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stats = {"published": 0, "documents": 0}

    # --- serving ---------------------------------------------------------------------------

    def document(self, ca_id: str, shard: int, kind: str = "full") -> PublishedCrl:
        """The current CRL of (CA, shard), regenerated first if it is stale or missing."""
        if kind not in ("full", "delta"):
            raise ValueError("kind must be 'full' or 'delta'")
        key = (ca_id, shard, kind)
        now_m = time.monotonic()
        cached = self._served.get(key)
        if cached is not None and now_m - cached[0] < self.recheck_s:
            return cached[1]
        ca = self._issuing_ca(ca_id)
        if shard != CA_LEVEL and not 0 <= shard < self.ctx.settings.crl_shards:
            raise NotFoundError(f"CA {ca_id} has shards 0..{self.ctx.settings.crl_shards - 1}",
                                code="crl_not_found")
        if ca.key_location == "offline":
            if shard != CA_LEVEL or kind != "full":
                raise NotFoundError("the root publishes one CRL, signed offline",
                                    code="crl_not_found")
            doc = self._stored(ca_id, CA_LEVEL, "full")
            if doc is None:
                raise NotFoundError(
                    "no root CRL uploaded yet: sign one with `fleettrust ca root-crl` and upload"
                    " it (POST /v1/crl/root)", code="crl_not_published")
        else:
            # When this process is publishing right now, answer with the stored CRL rather
            # than queue behind it (it is replaced within the publication time).
            if self.stale(ca_id) and self._lock.acquire(blocking=False):
                try:
                    self._publish_ca(ca_id, force=False)
                finally:
                    self._lock.release()
            doc = self._stored(ca_id, shard, kind)
            if doc is None:  # never published (raced with nothing to do): publish now
                self.publish_ca(ca_id, force=True)
                doc = self._stored(ca_id, shard, kind)
                assert doc is not None
        self._served[key] = (time.monotonic(), doc)
        return doc

    def _issuing_ca(self, ca_id: str) -> CertificateAuthority:
        with self.ctx.sessions() as session:
            ca = session.get(CertificateAuthority, ca_id)
        if ca is not None and ca.key_location == "external":
            raise NotFoundError(
                f"CA {ca_id}'s key is in the factory's own token: the platform cannot sign its"
                " CRL", code="crl_unavailable")
        if ca is None or ca.certificate_der is None:
            raise NotFoundError(f"CA {ca_id} not found", code="crl_not_found")
        return ca

    def _stored(self, ca_id: str, shard: int, kind: str) -> PublishedCrl | None:
        rows = rawread.fetch(self.ctx, select(
            CrlDocument.crl_number, CrlDocument.this_update, CrlDocument.next_update,
            CrlDocument.der).where(CrlDocument.ca_id == bindparam("ca"),
                                   CrlDocument.shard == bindparam("shard"),
                                   CrlDocument.kind == bindparam("kind")),
            {"ca": ca_id, "shard": shard, "kind": kind})
        if not rows:
            return None
        number, this_update, next_update, der = rows[0]
        return PublishedCrl(ca_id, shard, kind, int(number), _aware(this_update),
                            _aware(next_update), bytes(der))

    def stale(self, ca_id: str) -> bool:
        """Does ``ca_id`` need a new publication? Yes when its CRLs are missing, 2/3 of their
        validity is gone, an operation decided since is still being written (its rule may
        cover this CA), or this CA has ``revocations`` rows of an operation decided since.

        Rows written later for an operation the CRLs already reflect (a large operation,
        published from its rule) change nothing; this process remembers how far it checked,
        so the check stays a few indexed lookups. Reads never wait for a writer (``rawread``).
        """
        head = rawread.fetch(self.ctx, select(
            CrlDocument.log_seq, CrlDocument.op_seq, CrlDocument.this_update,
            CrlDocument.next_update).where(CrlDocument.ca_id == bindparam("ca"),
                                           CrlDocument.shard == CA_LEVEL,
                                           CrlDocument.kind == "full"), {"ca": ca_id})
        if not head:
            return True
        log_seq, op_seq, this_update, next_update = head[0]
        if self._due(_aware(this_update), _aware(next_update)):
            return True
        seen_log, seen_op = self._seen.get(ca_id, (0, 0))
        log_seq, op_seq = max(int(log_seq), seen_log), max(int(op_seq), seen_op)
        (newest,), = rawread.fetch(self.ctx, select(func.coalesce(func.max(Revocation.seq), 0))
                                   .where(Revocation.ca_id == bindparam("ca")), {"ca": ca_id})
        (newest_op,), = rawread.fetch(
            self.ctx, select(func.coalesce(func.max(RevocationOperation.seq), 0)))
        if newest <= log_seq and newest_op <= op_seq:
            return False
        pending_new = rawread.fetch(self.ctx, select(RevocationOperation.seq).where(
            RevocationOperation.seq > bindparam("op"),
            RevocationOperation.state == "pending").limit(1), {"op": op_seq})
        rows_of_new_ops = rawread.fetch(self.ctx, select(Revocation.seq)
                                        .join(RevocationOperation,
                                              RevocationOperation.id == Revocation.operation_id)
                                        .where(Revocation.ca_id == bindparam("ca"),
                                               Revocation.seq > bindparam("log"),
                                               RevocationOperation.seq > bindparam("op"))
                                        .limit(1), {"ca": ca_id, "log": log_seq, "op": op_seq})
        if pending_new or rows_of_new_ops:
            return True
        self._seen[ca_id] = (int(newest), int(newest_op))
        return False

    def _due(self, this_update: dt.datetime, next_update: dt.datetime) -> bool:
        return self.ctx.clock.now() >= this_update + (next_update - this_update) * REFRESH_AT

    # --- publishing -------------------------------------------------------------------------

    def publish_ca(self, ca_id: str, *, force: bool = False) -> int:
        """Regenerate every CRL of one CA (all shards and the CA-level CRL, complete and delta)
        if stale (or ``force``); return how many documents were written (0: already fresh)."""
        with self._lock:
            return self._publish_ca(ca_id, force=force)

    def _publish_ca(self, ca_id: str, *, force: bool) -> int:
        shards = self.ctx.settings.crl_shards
        families = [CA_LEVEL, *range(shards)]
        self._ensure_state_rows(ca_id, families)
        with self.ctx.transaction() as session:
            # Step 1: lock the CA's number counters; everything below is read after the lock.
            states = self._lock_states(session, ca_id)
            ca = session.get(CertificateAuthority, ca_id)
            if ca is None or ca.key_id is None or ca.certificate_der is None:
                raise NotFoundError(f"CA {ca_id} cannot sign CRLs", code="crl_unavailable")
            # Step 2: re-check staleness under the lock (another process may just have done it).
            head = session.scalars(select(CrlDocument).where(
                CrlDocument.ca_id == ca_id, CrlDocument.shard == CA_LEVEL,
                CrlDocument.kind == "full")).first()
            log_seq = int(session.scalar(select(func.max(Revocation.seq))
                                         .where(Revocation.ca_id == ca_id)) or 0)
            op_seq = int(session.scalar(select(func.max(RevocationOperation.seq))) or 0)
            reanchor = head is None or self._due(head.this_update, head.next_update)
            if not force and head is not None and not reanchor and (
                    log_seq <= head.log_seq and op_seq <= head.op_seq):
                return 0
            # Step 3: what is revoked / held, per certificate and by decided operations.
            now = self.ctx.clock.now().replace(microsecond=0)
            next_update = now + self.validity
            leaves, everything = self._entries(session, ca_id)
            digest = hash(frozenset(everything.values()))
            if (not force and not reanchor and head is not None
                    and self._digests.get(ca_id) == (head.crl_number, digest)):
                # Same entries as the CRLs just published by this process (a large operation's
                # rows were written after its rule was published): nothing to re-sign.
                for row in session.scalars(select(CrlDocument)
                                           .where(CrlDocument.ca_id == ca_id)):
                    row.log_seq, row.op_seq = log_seq, op_seq
                return 0
            issuer = x509.load_der_x509_certificate(ca.certificate_der)
            signer = self.ctx.signer(ca.key_id)
            cache = self._caches.setdefault(ca_id, crlmod.EntryCache())
            by_shard: dict[int, dict[int, crlmod.CrlEntry]] = {s: {} for s in range(shards)}
            for serial, entry in leaves.items():
                by_shard[serial % shards][serial] = entry
            docs = {(row.shard, row.kind): row for row in session.scalars(
                select(CrlDocument).where(CrlDocument.ca_id == ca_id))}
            base = self.ctx.settings.base_url
            written = 0
            used_anchors: set[tuple[str, int, int]] = set()
            for family in families:
                current = everything if family == CA_LEVEL else by_shard[family]
                scope = (crlmod.Scope(None) if family == CA_LEVEL else
                         crlmod.Scope(full_url(base, ca_id, family), only_user_certs=True))
                state = states[family]
                full_no, delta_no = state.crl_number + 1, state.crl_number + 2
                full_der = signer.sign_crl(crlmod.build_complete_crl(
                    issuer, list(current.values()), crl_number=full_no, this_update=now,
                    next_update=next_update, scope=scope,
                    freshest_url=delta_url(base, ca_id, family), cache=cache,
                )).public_bytes(serialization.Encoding.DER)
                anchor = docs.get((family, "anchor"))
                changes: list[crlmod.CrlEntry] = []
                if not reanchor and anchor is not None:
                    anchor_no = anchor.crl_number
                    anchor_entries = self._anchor_entries(anchor)
                    changes = crlmod.delta_entries(anchor_entries, current, now)
                if reanchor or anchor is None or 2 * len(changes) > max(len(current), 64):
                    # Scheduled, first, or a delta bigger than half the base: nobody gains
                    # from it; this complete CRL becomes the base of an empty delta.
                    anchor_no, anchor_entries, changes = full_no, current, []
                    anchor = self._put(session, docs, ca_id, family, "anchor", full_no, None,
                                       now, next_update, full_der, log_seq, op_seq)
                self._anchors[(ca_id, family, anchor_no)] = dict(anchor_entries)
                used_anchors.add((ca_id, family, anchor_no))
                delta_der = signer.sign_crl(crlmod.build_delta_crl(
                    issuer, changes,
                    crl_number=delta_no, base_crl_number=anchor_no, this_update=now,
                    next_update=next_update, scope=scope, cache=cache,
                )).public_bytes(serialization.Encoding.DER)
                self._put(session, docs, ca_id, family, "full", full_no, None, now,
                          next_update, full_der, log_seq, op_seq)
                self._put(session, docs, ca_id, family, "delta", delta_no, anchor_no, now,
                          next_update, delta_der, log_seq, op_seq)
                state.crl_number = delta_no
                state.base_seq = log_seq
                state.this_update, state.next_update, state.der = now, next_update, full_der
                written += 2
            ca_level_full = docs[(CA_LEVEL, "full")]
            self._digests[ca_id] = (ca_level_full.crl_number, digest)
            self._anchors = {k: v for k, v in self._anchors.items()
                             if k[0] != ca_id or k in used_anchors}
            if reanchor:
                cache.retain(everything.values())
        self._served = {k: v for k, v in self._served.items() if k[0] != ca_id}
        self.stats["published"] += 1
        self.stats["documents"] += written
        log.info("published %d CRL documents for CA %s (%d entries)", written, ca_id,
                 len(everything))
        return written

    def _ensure_state_rows(self, ca_id: str, families: Sequence[int]) -> None:
        with self.ctx.sessions() as session:
            have = set(session.scalars(select(CrlState.shard).where(CrlState.ca_id == ca_id)))
        missing = [f for f in families if f not in have]
        if not missing:
            return
        epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
        rows = [{"ca_id": ca_id, "shard": f, "crl_number": 0, "base_seq": 0,
                 "this_update": epoch, "next_update": epoch, "der": b""} for f in missing]
        with self.ctx.transaction() as session:
            dialect = session.get_bind().dialect.name
            stmt = (postgresql.insert(CrlState) if dialect == "postgresql"
                    else sqlite.insert(CrlState))
            session.execute(stmt.on_conflict_do_nothing(
                index_elements=["ca_id", "shard"]), rows)

    @staticmethod
    def _lock_states(session: Session, ca_id: str) -> dict[int, CrlState]:
        q = select(CrlState).where(CrlState.ca_id == ca_id)
        if session.get_bind().dialect.name == "postgresql":
            q = q.with_for_update()
        return {row.shard: row for row in session.scalars(q)}

    @staticmethod
    def _put(session: Session, docs: dict[tuple[int, str], CrlDocument], ca_id: str,
             shard: int, kind: str,
             number: int, base_number: int | None, this_update: dt.datetime,
             next_update: dt.datetime, der: bytes, log_seq: int, op_seq: int) -> CrlDocument:
        key = (shard, kind)
        row = docs.get(key)
        if row is None:
            row = CrlDocument(ca_id=ca_id, shard=shard, kind=kind)
            session.add(row)
            docs[key] = row
        row.crl_number, row.base_number = number, base_number
        row.this_update, row.next_update, row.der = this_update, next_update, der
        row.log_seq, row.op_seq = log_seq, op_seq
        return row

    def _anchor_entries(self, anchor: CrlDocument) -> dict[int, crlmod.CrlEntry]:
        key = (anchor.ca_id, anchor.shard, anchor.crl_number)
        cached = self._anchors.get(key)
        if cached is None:
            cached = crlmod.entries_of(x509.load_der_x509_crl(anchor.der))
        return cached

    def _entries(self, session: Session, ca_id: str
                 ) -> tuple[dict[int, crlmod.CrlEntry], dict[int, crlmod.CrlEntry]]:
        """(device leaves for the shards, everything for the CA-level CRL), normalised."""
        leaves: dict[int, crlmod.CrlEntry] = {}
        everything: dict[int, crlmod.CrlEntry] = {}
        times: dict[dt.datetime, dt.datetime] = {}

        def add(serial_hex: str, kind: str, at: dt.datetime, reason: str | None) -> None:
            serial = int(serial_hex, 16)
            when = times.get(at) or times.setdefault(at, at.replace(microsecond=0))
            entry = crlmod.CrlEntry(serial, when, None if reason == "unspecified" else reason)
            everything[serial] = entry
            if kind == "device":
                leaves[serial] = entry

        for serial_hex, kind, status, revoked_at, reason in session.execute(
                select(Certificate.serial_hex, Certificate.kind, Certificate.status,
                       Certificate.revoked_at, Certificate.revocation_reason)
                .where(Certificate.ca_id == ca_id, Certificate.status != "good")):
            if revoked_at is not None:
                add(serial_hex, kind, revoked_at,
                    "certificateHold" if status == "hold" else reason)
        # Operations decided whose per-certificate rows are not all written yet.
        for op in session.scalars(select(RevocationOperation).where(
                RevocationOperation.state == "pending", RevocationOperation.action == "revoke")
                .order_by(RevocationOperation.seq)):
            for serial_hex, kind in session.execute(
                    select(Certificate.serial_hex, Certificate.kind).where(
                        Certificate.ca_id == ca_id, revsvc.leaf_scope(op),
                        Certificate.status != "revoked")):
                serial = int(serial_hex, 16)
                if serial not in everything or everything[serial].reason == "certificateHold":
                    add(serial_hex, kind, op.revoked_at, op.reason)
        return leaves, everything

    # --- the root's CRL (signed offline, uploaded) -----------------------------------------

    def store_uploaded(self, data: bytes) -> PublishedCrl:
        """Check and store a root CRL signed offline: issued and signed by the stored root,
        a complete CRL with a CRL number higher than the stored one."""
        try:
            crl = (x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----")
                   else x509.load_der_x509_crl(data))
        except ValueError as exc:
            raise ValidationError(f"not a CRL (DER or PEM): {exc}", code="crl_malformed") from exc
        with self.ctx.transaction() as session:
            roots = session.scalars(select(CertificateAuthority).where(
                CertificateAuthority.kind == "root")).all()
            root = next((r for r in roots if r.certificate_der is not None and
                         x509.load_der_x509_certificate(r.certificate_der).subject
                         == crl.issuer), None)
            if root is None or root.certificate_der is None:
                raise ValidationError("the CRL's issuer is not the fleet's root",
                                      code="crl_wrong_issuer")
            root_cert = x509.load_der_x509_certificate(root.certificate_der)
            try:
                ok = crl.is_signature_valid(root_cert.public_key())  # type: ignore[arg-type]
            except (TypeError, ValueError, InvalidSignature):
                ok = False
            if not ok:
                raise ValidationError("the CRL's signature does not verify with the root key",
                                      code="crl_signature_invalid")
            try:
                number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
            except x509.ExtensionNotFound as exc:
                raise ValidationError("the CRL has no CRL number", code="crl_malformed") from exc
            with contextlib.suppress(x509.ExtensionNotFound):
                crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
                raise ValidationError("a delta CRL cannot be the root's CRL",
                                      code="crl_malformed")
            this_update = crl.last_update_utc
            next_update = crl.next_update_utc
            if next_update is None or next_update <= self.ctx.clock.now():
                raise ValidationError("the CRL has expired (or has no nextUpdate)",
                                      code="crl_expired")
            row = session.scalars(select(CrlDocument).where(
                CrlDocument.ca_id == root.id, CrlDocument.shard == CA_LEVEL,
                CrlDocument.kind == "full").with_for_update()).first()
            if row is not None and number <= row.crl_number:
                raise ConflictError(
                    f"CRL number {number} is not higher than the stored root CRL's"
                    f" {row.crl_number}", code="crl_number_not_increasing")
            if row is None:
                row = CrlDocument(ca_id=root.id, shard=CA_LEVEL, kind="full")
                session.add(row)
            der = crl.public_bytes(serialization.Encoding.DER)
            row.crl_number, row.base_number = number, None
            row.this_update, row.next_update, row.der = this_update, next_update, der
            row.log_seq, row.op_seq = 0, 0
            session.flush()
            doc = _doc(row)
        self._served = {k: v for k, v in self._served.items() if k[0] != root.id}
        return doc

    # --- running in the background ----------------------------------------------------------

    def attach(self, index: RevocationIndex) -> None:
        """Regenerate after every index sync that changed something (see :meth:`run`)."""
        index.subscribe(self._on_events)
        index.subscribe_rules(self._on_rules)

    def _on_events(self, events: list[RevocationEvent]) -> None:
        self._mark({e.ca_id for e in events})

    def _on_rules(self, rules: list[RevocationRule]) -> None:
        cas: set[str] = set()
        batches: list[str] = []
        for r in rules:
            cas.update(r.ca_ids)
            cas.update(r.leaf_ca_ids)
            if r.batch_id is not None:
                batches.append(r.batch_id)
        if batches:
            with self.ctx.sessions() as session:
                cas.update(session.scalars(select(Batch.ca_id).where(Batch.id.in_(batches))))
        self._mark(cas)

    def _mark(self, ca_ids: Iterable[str]) -> None:
        with self._dirty_lock:
            self._dirty.update(ca_ids)
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop closed
                loop.call_soon_threadsafe(wake.set)

    def publish_dirty(self) -> int:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        n = 0
        for ca_id in sorted(dirty):
            try:
                with self.ctx.sessions() as session:
                    ca = session.get(CertificateAuthority, ca_id)
                if ca is None or ca.key_location != "platform" or ca.key_id is None:
                    continue
                n += self.publish_ca(ca_id)
            except Exception:
                log.exception("publishing the CRLs of CA %s failed", ca_id)
        return n

    def publish_stale(self) -> int:
        """Publish every CA (platform key) whose CRLs are missing or stale; return how many
        documents were written. For consumers of ``crl_documents`` (the Mosquitto bundle) that
        need every CRL to exist now."""
        with self.ctx.sessions() as session:
            ca_ids = list(session.scalars(select(CertificateAuthority.id).where(
                CertificateAuthority.key_location == "platform",
                CertificateAuthority.key_id.is_not(None),
                CertificateAuthority.certificate_der.is_not(None))
                .order_by(CertificateAuthority.id)))
        return sum(self.publish_ca(ca_id) for ca_id in ca_ids if self.stale(ca_id))

    def publish_due(self) -> int:
        """Regenerate every published CA whose CRLs reached 2/3 of their validity."""
        with self.ctx.sessions() as session:
            heads = session.execute(select(CrlDocument.ca_id, CrlDocument.this_update,
                                           CrlDocument.next_update)
                                    .join(CertificateAuthority,
                                          CertificateAuthority.id == CrlDocument.ca_id)
                                    .where(CrlDocument.shard == CA_LEVEL,
                                           CrlDocument.kind == "full",
                                           CertificateAuthority.key_location == "platform")
                                    ).all()
        n = 0
        for ca_id, this_update, next_update in heads:
            if self._due(this_update, next_update):
                try:
                    n += self.publish_ca(ca_id)
                except Exception:
                    log.exception("scheduled CRL publication of CA %s failed", ca_id)
        return n

    async def run(self, index: RevocationIndex | None = None,
                  check_interval: float = CHECK_INTERVAL_S) -> None:
        """Background task: publish after revocations (debounced), before nextUpdate, and
        finish revocation operations a crashed process left pending. Cancel to stop."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if index is not None:
            self.attach(index)
        next_check = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(),
                                       timeout=max(0.0, next_check - time.monotonic()))
            self._wake.clear()
            try:
                if self._dirty:
                    await asyncio.sleep(DEBOUNCE_S)  # coalesce a burst of events
                    await asyncio.to_thread(self.publish_dirty)
                if time.monotonic() >= next_check:
                    next_check = time.monotonic() + check_interval
                    await asyncio.to_thread(revsvc.materialize_pending, self.ctx)
                    await asyncio.to_thread(self.publish_due)
            except Exception:
                log.exception("CRL publisher iteration failed; retrying")


def _aware(value: object) -> dt.datetime:
    """A driver timestamp (SQLite: UTC text without zone) as an aware UTC datetime."""
    parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(parsed, dt.datetime)
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


def max_age(doc: PublishedCrl, now: dt.datetime) -> int:
    """Seconds a client may cache ``doc``: at most :data:`MAX_AGE_S`, never past nextUpdate."""
    return max(0, min(MAX_AGE_S, int((doc.next_update - now).total_seconds())))


__all__ = [
    "CA_LEVEL",
    "DEFAULT_VALIDITY",
    "CrlPublisher",
    "PublishedCrl",
    "crl_urls",
    "delta_url",
    "full_url",
    "max_age",
]
