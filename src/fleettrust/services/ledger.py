"""The transparency log's sequencer, storage and read side (proofs, tree heads, histories).

What this module does:

* **Sequencer** (:func:`sequence_once`, :func:`sequence_pending`, :func:`run_sequencer`,
  :func:`start_sequencer`): appends every ``audit_events`` row to the Merkle log in ``id``
  order, one leaf per event (``ledger.entry``: the whole event, plus the SHA-256 and DER of each
  certificate the event issued — so every certificate fleettrust issues is in the log), then
  signs a new tree head (STH) in the same transaction. One sequencer at a time: a PostgreSQL
  transaction-level advisory lock (others skip their turn), SQLite's ``BEGIN IMMEDIATE`` (others
  wait). ``log_leaves.leaf_index`` (primary key) and ``audit_event_id`` (unique) make a double
  assignment impossible even if the lock were bypassed.
* **No event is skipped.** Leaves follow audit ids; a hole in the ids (a transaction that took an
  id and has not committed yet, or rolled back) stops the batch there. On PostgreSQL the hole is
  declared permanent only after every transaction that held a write lock on ``audit_events``
  when it was seen has ended (``pg_locks``; no blocking, nobody waits); on SQLite the sequencer
  holds the only write lock, so a hole is permanent at once. A permanent hole becomes a *gap
  leaf* (``first_id..last_id``), so the log accounts for every id.
* **Storage** (:class:`LedgerStore`): leaves with their bytes and hash, plus the hash of every
  complete subtree (``log_nodes``). Appending ``k`` leaves reads the O(log n) frontier and writes
  about ``2k`` rows; any root or proof of any size reads O(log n) rows in two queries.
* **Read side** for the API: latest / historical STHs, inclusion proofs (by index, leaf hash
  or certificate serial), consistency proofs, entries, a device's history with proofs.
* **Checks**: :func:`check_log` recomputes every leaf hash and the root and compares them with
  the signed tree head; :func:`unlogged` lists audit events and certificates not in the log.

What it does not do: it never modifies an audit event (they are read only); it does not decide
who may see entries beyond the role checks below (STHs and proofs are public: hashes only;
entries and histories need an operator, auditor, the device's factory or its owner); and it
holds no private key material (the log key lives in the key store, only its id is stored).
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Connection, bindparam, func, insert, select, text, union_all
from sqlalchemy.orm import Session

from fleettrust.errors import ConflictError, NotFoundError, ValidationError
from fleettrust.ids import new_id
from fleettrust.ledger import entry as entries
from fleettrust.ledger import merkle
from fleettrust.ledger.sth import (
    ConsistencyProof,
    InclusionProof,
    SignedTreeHead,
    TreeHeadError,
    b64,
    log_id_of,
    sign_tree_head,
    verify_sth,
)
from fleettrust.services.auth import Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import check_factory_scope
from fleettrust.signing.base import SignerAlgorithm
from fleettrust.storage.ledger_models import (
    LogCertificate,
    LogKey,
    LogLeaf,
    LogNode,
    LogSth,
    node_id,
    node_of,
)
from fleettrust.storage.models import AuditEvent, Certificate, Device

log = logging.getLogger("fleettrust.ledger")

PG_LOCK_KEY: Final = 0x66_6C_6C_67  # "fllg": one sequencer at a time
DEFAULT_BATCH: Final = 2000
MAX_ENTRIES_PAGE: Final = 1000
STH_MAX_AGE: Final = dt.timedelta(hours=1)  # re-sign an unchanged tree this often
LOG_KEY_LABEL: Final = "transparency-log"
#: detail keys whose value is the serial of a certificate the event *issued*
ISSUED_SERIAL_KEYS: Final = ("serial", "ca_serial", "new_serial", "certificate_serial")
READ_ROLES: Final = ("admin", "auditor")
HISTORY_ROLES: Final = ("admin", "auditor", "factory", "device-owner", "repair-centre")


# --- storage ------------------------------------------------------------------------------------

# Built once, so executions reuse the compiled statement. A leaf's node id is its index (level
# 0), inner nodes have ids >= 2^48: one round trip for both tables.
_NODE_HASHES: Final = union_all(
    select(LogLeaf.leaf_index, LogLeaf.leaf_hash)
    .where(LogLeaf.leaf_index.in_(bindparam("leaves", expanding=True))),
    select(LogNode.node_id, LogNode.hash)
    .where(LogNode.node_id.in_(bindparam("inner", expanding=True))),
)


@dataclass(frozen=True)
class NewLeaf:
    data: bytes
    kind: str = entries.KIND_EVENT
    audit_event_id: int | None = None
    device_id: str | None = None
    certificates: tuple[tuple[str, str], ...] = ()  # (serial, sha256 hex) first logged here


class LedgerCorruptError(RuntimeError):
    """Stored hashes are missing or inconsistent (someone tampered with the tables)."""


class LedgerStore:
    """The Merkle log's tables, through one session (the caller owns the transaction)."""

    def __init__(self, session: Session) -> None:
        self.session = session

    # reads

    def size(self) -> int:
        last = self.session.scalar(select(func.max(LogLeaf.leaf_index)))
        return 0 if last is None else int(last) + 1

    def last_event_id(self) -> int:
        """The highest audit id the log accounts for, 0 if none. A gap leaf is always followed
        by the event above it in the same append, so the highest logged event id is enough."""
        last = self.session.scalar(select(func.max(LogLeaf.audit_event_id)))
        return 0 if last is None else int(last)

    def nodes(self, keys: Iterable[merkle.Node]) -> dict[merkle.Node, bytes]:
        """Hashes of complete subtrees (level 0 = leaf hashes); all must exist."""
        wanted = set(keys)
        leaves = [i for lv, i in wanted if lv == 0]
        inner = [node_id(lv, i) for lv, i in wanted if lv > 0]
        out: dict[merkle.Node, bytes] = {}
        if wanted:
            for k, h in self.session.execute(_NODE_HASHES, {"leaves": leaves, "inner": inner}):
                out[node_of(int(k))] = bytes(h)
        missing = wanted - out.keys()
        if missing:
            raise LedgerCorruptError(f"log nodes missing: {sorted(missing)[:5]}")
        return out

    def root(self, size: int) -> bytes:
        if size == 0:
            return merkle.EMPTY_ROOT
        keys = merkle.range_nodes(0, size)
        got = self.nodes(keys)
        return merkle.fold_range([got[k] for k in keys])

    def _check_size(self, size: int, current: int | None = None) -> int:
        current = self.size() if current is None else current
        if not 0 <= size <= current:
            raise NotFoundError(f"the log has {current} leaves; no tree of size {size}",
                                code="tree_size_unknown")
        return current

    def _fetch_for(self, keys: set[merkle.Node], size: int) -> dict[merkle.Node, bytes]:
        """Nodes of a tree of ``size`` leaves; a size beyond the log is a 404, not corruption."""
        try:
            return self.nodes(keys)
        except LedgerCorruptError:
            self._check_size(size)
            raise

    def inclusion_proofs(self, indices: Sequence[int], size: int) -> dict[int, list[bytes]]:
        """Inclusion proofs of several leaves against one tree size, with one node fetch."""
        shapes = {}
        for i in indices:
            if not 0 <= i < size:
                raise NotFoundError(f"leaf {i} is not in the tree of size {size}",
                                    code="leaf_not_in_tree")
            shapes[i] = merkle.inclusion_ranges(i, size)
        got = self._fetch_for(merkle.nodes_needed(r for rs in shapes.values() for r in rs), size)
        return {i: merkle.compute_hashes(rs, got.__getitem__) for i, rs in shapes.items()}

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return self.inclusion_proof_and_leaf(index, size)[0]

    def inclusion_proof_and_leaf(self, index: int, size: int) -> tuple[list[bytes], bytes]:
        """The audit path of leaf ``index`` in the tree of ``size`` leaves, and its leaf hash
        (one query for both)."""
        if not 0 <= index < size:
            raise NotFoundError(f"leaf {index} is not in the tree of size {size}",
                                code="leaf_not_in_tree")
        ranges = merkle.inclusion_ranges(index, size)
        got = self._fetch_for(merkle.nodes_needed(ranges) | {(0, index)}, size)
        return merkle.compute_hashes(ranges, got.__getitem__), got[(0, index)]

    def consistency_proof(self, first: int, second: int) -> list[bytes]:
        if not 0 <= first <= second:
            raise ValidationError(f"first ({first}) must be between 0 and second ({second})",
                                  code="bad_tree_sizes")
        ranges = merkle.consistency_ranges(first, second)
        if not ranges:
            self._check_size(second)
            return []
        # the last range ends at `second`: its nodes exist only if the log is that large
        return merkle.compute_hashes(ranges, self._fetch_for(merkle.nodes_needed(ranges),
                                                             second).__getitem__)

    # writes

    def append(self, leaves: Sequence[NewLeaf], now: dt.datetime,
               size: int | None = None) -> tuple[int, bytes]:
        """Append ``leaves`` at the end; returns the new size and root."""
        size = self.size() if size is None else size
        hashes = [merkle.leaf_hash(leaf.data) for leaf in leaves]
        frontier = self.nodes(merkle.frontier_nodes(size))
        created = merkle.append_nodes(size, frontier, hashes)
        writer = _BulkWriter(self.session)
        ts = writer.ts(now)
        writer.insert(LogLeaf, ("leaf_index", "audit_event_id", "kind", "leaf_hash", "data",
                                "device_id", "sequenced_at"), [
            (size + j, leaf.audit_event_id, leaf.kind, hashes[j], leaf.data, leaf.device_id, ts)
            for j, leaf in enumerate(leaves)])
        writer.insert(LogNode, ("node_id", "hash"),
                      [(node_id(lv, i), h) for lv, i, h in created if lv > 0])
        certs = [(serial, size + j, sha) for j, leaf in enumerate(leaves)
                 for serial, sha in leaf.certificates]
        writer.insert(LogCertificate, ("serial_hex", "leaf_index", "cert_sha256"), certs)
        new_size = size + len(leaves)
        all_nodes = dict(frontier)
        all_nodes.update(((lv, i), h) for lv, i, h in created)
        keys = merkle.range_nodes(0, new_size)
        return new_size, merkle.fold_range([all_nodes[k] for k in keys])


class _BulkWriter:
    """COPY on PostgreSQL (psycopg), the driver's executemany on SQLite, Core elsewhere."""

    def __init__(self, session: Session) -> None:
        self._conn: Connection = session.connection()
        self._dialect = self._conn.dialect
        self._mode = ("copy" if self._dialect.name == "postgresql"
                      and self._dialect.driver == "psycopg"
                      else "sqlite" if self._dialect.name == "sqlite" else "core")

    def ts(self, value: dt.datetime) -> Any:
        if self._mode != "sqlite":
            return value
        col = LogLeaf.__table__.c.sequenced_at
        proc = col.type.dialect_impl(self._dialect).bind_processor(self._dialect)
        return proc(value) if proc else value

    def insert(self, model: type[Any], columns: Sequence[str],
               rows: list[tuple[Any, ...]]) -> None:
        if not rows:
            return
        table = model.__table__
        quote = self._dialect.identifier_preparer.quote
        target = f"{quote(table.name)} ({', '.join(quote(c) for c in columns)})"
        raw = self._conn.connection.driver_connection
        if self._mode == "copy" and raw is not None:
            with raw.cursor() as cur, cur.copy(f"COPY {target} FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        elif self._mode == "sqlite" and raw is not None:
            cur = raw.cursor()
            try:
                # identifiers are our own, quoted by the dialect; values are bound
                sql = f"INSERT INTO {target} VALUES ({', '.join('?' * len(columns))})"  # noqa: S608
                cur.executemany(sql, rows)
            finally:
                cur.close()
        else:
            self._conn.execute(insert(table), [dict(zip(columns, r, strict=True)) for r in rows])


# --- the log key and tree heads -------------------------------------------------------------------


def _active_key(session: Session) -> LogKey | None:
    return session.scalars(select(LogKey).where(LogKey.status == "active")
                           .order_by(LogKey.created_at.desc()).limit(1)).first()


def _public_key(row: LogKey) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(row.public_key_der)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def _sth_of(row: LogSth, key: LogKey) -> SignedTreeHead:
    return SignedTreeHead(tree_size=row.tree_size, timestamp=row.timestamp_ms,
                          root_hash=bytes(row.root_hash), signature=bytes(row.signature),
                          log_id=bytes.fromhex(key.log_id_hex))


def _latest_sth_row(session: Session) -> LogSth | None:
    return session.scalars(select(LogSth).order_by(LogSth.id.desc()).limit(1)).first()


def _sign(ctx: ServiceContext, session: Session, key: LogKey, size: int, root: bytes,
          now: dt.datetime, last: LogSth | None) -> SignedTreeHead:
    ts = int(now.timestamp() * 1000)
    if last is not None:
        ts = max(ts, last.timestamp_ms)  # tree head timestamps never go backwards
    signer = ctx.signer(key.key_id)
    sth = sign_tree_head(signer.sign_bytes, bytes.fromhex(key.log_id_hex), size, ts, root)
    session.add(LogSth(tree_size=size, timestamp_ms=ts, root_hash=root,
                       signature=sth.signature, key_id=key.id, created_at=now))
    return sth


# --- the sequencer --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceResult:
    appended: int  # leaves appended (events + gap leaves)
    tree_size: int
    sth: SignedTreeHead | None  # signed in this pass, if any
    busy: bool = False  # another process held the sequencer lock (PostgreSQL)
    waiting_on_gap: int | None = None  # first audit id not yet committed (or not known lost)
    more: bool = False  # the batch was full: call again


@dataclass
class _GapWatch:
    """PostgreSQL: which writers held ``audit_events`` when a hole at ``expected`` was seen."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    holders: dict[int, frozenset[str]] = field(default_factory=dict)


def sequence_once(ctx: ServiceContext, *, max_batch: int = DEFAULT_BATCH) -> SequenceResult:
    """One pass: append up to ``max_batch`` pending audit events, then sign a tree head."""
    now = ctx.clock.now()
    created_key: str | None = None
    try:
        with ctx.transaction() as s:
            pg = s.get_bind().dialect.name == "postgresql"
            if pg:
                if not s.scalar(select(func.pg_try_advisory_xact_lock(PG_LOCK_KEY))):
                    return SequenceResult(0, -1, None, busy=True)
            else:
                # first statement: BEGIN IMMEDIATE, i.e. this process is now the only writer
                s.execute(text("SELECT 1"))
            key = _active_key(s)
            if key is None:
                signer = ctx.key_store.generate(LOG_KEY_LABEL, SignerAlgorithm.EC_P256)
                created_key = signer.key_id
                pub = signer.public_key()
                assert isinstance(pub, ec.EllipticCurvePublicKey)
                key = LogKey(id=new_id("lk"), key_id=signer.key_id,
                             public_key_der=pub.public_bytes(
                                 serialization.Encoding.DER,
                                 serialization.PublicFormat.SubjectPublicKeyInfo),
                             log_id_hex=log_id_of(pub).hex(), status="active", created_at=now)
                s.add(key)
                s.flush()
            store = LedgerStore(s)
            size = store.size()
            expected = store.last_event_id() + 1
            rows = s.execute(
                select(AuditEvent.id, AuditEvent.occurred_at, AuditEvent.actor,
                       AuditEvent.actor_role, AuditEvent.action, AuditEvent.target_type,
                       AuditEvent.target_id, AuditEvent.remote_addr, AuditEvent.details)
                .where(AuditEvent.id >= expected).order_by(AuditEvent.id).limit(max_batch)
            ).mappings().all()
            take: list[Any] = []
            order: list[int | NewLeaf] = []  # audit ids of events and gap leaves, in id order
            waiting: int | None = None
            for row in rows:
                if row["id"] != expected:
                    # PostgreSQL: a hole after some events usually fills by the next pass
                    if (take and pg) or not _hole_is_final(ctx, s, pg, expected, int(row["id"])):
                        waiting = expected
                        break
                    order.append(NewLeaf(entries.canonical_json(
                        entries.gap_entry(expected, int(row["id"]) - 1)), kind=entries.KIND_GAP))
                    log.warning("audit ids %d..%d were never committed: gap leaf",
                                expected, int(row["id"]) - 1)
                take.append(row)
                order.append(int(row["id"]))
                expected = int(row["id"]) + 1
            if pg:
                _forget_holes(ctx, expected)
            built = {leaf.audit_event_id: leaf for leaf in _event_leaves(s, take)}
            leaves = [x if isinstance(x, NewLeaf) else built[x] for x in order]
            last = _latest_sth_row(s)
            sth: SignedTreeHead | None = None
            if leaves:
                new_size, root = store.append(leaves, now, size)
                sth = _sign(ctx, s, key, new_size, root, now, last)
            elif last is None or last.key_id != key.id or now - last.created_at > STH_MAX_AGE:
                new_size = size
                sth = _sign(ctx, s, key, size, store.root(size), now, last)
            else:
                new_size = size
            return SequenceResult(len(leaves), new_size, sth, waiting_on_gap=waiting,
                                  more=len(rows) == max_batch and waiting is None)
    except BaseException:
        if created_key is not None:
            try:
                ctx.key_store.delete(created_key)
            except Exception:  # pragma: no cover - best effort; the original error matters
                log.exception("could not delete log key %s after a failed pass", created_key)
        raise


def _forget_holes(ctx: ServiceContext, below: int) -> None:
    """Drop watches of holes the log has moved past (they filled by themselves)."""
    watch: _GapWatch = ctx.cached("ledger", "gap-watch", _GapWatch)
    with watch.lock:
        for k in [k for k in watch.holders if k < below]:
            del watch.holders[k]


def _hole_is_final(ctx: ServiceContext, s: Session, pg: bool, expected: int,
                   next_visible: int) -> bool:
    """Are audit ids ``expected .. next_visible-1`` lost for good (never to be committed)?"""
    if not pg:
        return True  # we hold SQLite's only write lock: nobody is half-way through an insert
    watch: _GapWatch = ctx.cached("ledger", "gap-watch", _GapWatch)
    with watch.lock:
        seen = watch.holders.get(expected)
    if seen is None:
        # Every id below next_visible was taken before it, by a transaction that held a
        # RowExclusiveLock on audit_events from then until it ends. Those still running now:
        seen = frozenset(s.scalars(text(
            "SELECT DISTINCT virtualtransaction FROM pg_locks WHERE locktype = 'relation' "
            "AND relation = 'audit_events'::regclass AND pid <> pg_backend_pid()")).all())
        if seen:
            with watch.lock:
                watch.holders[expected] = seen
            return False
    elif s.scalar(text("SELECT 1 FROM pg_locks WHERE virtualtransaction = ANY(:v) LIMIT 1"),
                  {"v": list(seen)}):
        return False  # one of them is still running: it may commit the missing ids
    with watch.lock:
        watch.holders.pop(expected, None)
    # all writers of that time have ended: whatever is still missing was rolled back
    late = s.scalar(select(func.min(AuditEvent.id)).where(AuditEvent.id >= expected,
                                                          AuditEvent.id < next_visible))
    return late is None


def _issued_serials(details: Mapping[str, Any]) -> list[str]:
    out = [str(details[k]).lower() for k in ISSUED_SERIAL_KEYS if isinstance(details.get(k), str)]
    serials = details.get("serials")
    if isinstance(serials, list):
        out.extend(str(x).lower() for x in serials if isinstance(x, str))
    return out


def _event_leaves(s: Session, rows: Sequence[Mapping[str, Any]]) -> list[NewLeaf]:
    """The leaves of audit events (certificates they issued looked up in one or two queries)."""
    wanted: dict[int, list[str]] = {}
    by_subject: dict[int, str] = {}
    for row in rows:
        details = row["details"] or {}
        wanted[int(row["id"])] = _issued_serials(details)
        # batch.create names its own new CA by id only
        if row["action"] == "batch.create" and details.get("own_ca") and details.get("ca_id"):
            by_subject[int(row["id"])] = str(details["ca_id"])
    all_serials = {x for xs in wanted.values() for x in xs}
    certs: dict[str, tuple[bytes, str | None]] = {}
    if all_serials:
        for serial, der, device_id in s.execute(
                select(Certificate.serial_hex, Certificate.der, Certificate.device_id)
                .where(Certificate.serial_hex.in_(all_serials))):
            certs[serial] = (bytes(der), device_id)
    subject_certs: dict[str, list[str]] = {}
    if by_subject:
        for serial, der, device_id, subject in s.execute(
                select(Certificate.serial_hex, Certificate.der, Certificate.device_id,
                       Certificate.subject_ca_id)
                .where(Certificate.subject_ca_id.in_(set(by_subject.values())),
                       Certificate.kind == "ca")):
            certs[serial] = (bytes(der), device_id)
            subject_certs.setdefault(str(subject), []).append(serial)
    for event_id, ca_id in by_subject.items():
        wanted[event_id].extend(subject_certs.get(ca_id, []))
    logged = set(s.scalars(select(LogCertificate.serial_hex)
                           .where(LogCertificate.serial_hex.in_(list(certs))))) if certs else set()
    out: list[NewLeaf] = []
    for row in rows:
        refs = [entries.CertificateRef(x, certs[x][0])
                for x in dict.fromkeys(wanted[int(row["id"])]) if x in certs]
        body = entries.event_entry(row, refs)
        device_id = entries.entry_device_id(body)
        if device_id is None:
            devs = {certs[r.serial_hex][1] for r in refs} - {None}
            device_id = devs.pop() if len(devs) == 1 else None
        first_time = []
        for r in refs:
            if r.serial_hex not in logged:
                logged.add(r.serial_hex)
                first_time.append((r.serial_hex, r.sha256_hex))
        out.append(NewLeaf(entries.canonical_json(body), entries.KIND_EVENT, int(row["id"]),
                           device_id[:64] if device_id else None, tuple(first_time)))
    return out


def sequence_pending(ctx: ServiceContext, *, max_batch: int = DEFAULT_BATCH,
                     timeout: float = 30.0) -> int:
    """Sequence until nothing committed is left (waiting out busy locks); returns leaves added."""
    deadline = time.monotonic() + timeout
    total = 0
    while True:
        res = sequence_once(ctx, max_batch=max_batch)
        total += res.appended
        if res.more or (res.appended and res.waiting_on_gap is None):
            continue
        if not res.busy and res.waiting_on_gap is None:
            return total
        if time.monotonic() > deadline:
            raise TimeoutError(f"sequencer did not catch up in {timeout} s "
                               f"(busy={res.busy}, waiting on audit id {res.waiting_on_gap})")
        time.sleep(0.02)


def run_sequencer(ctx: ServiceContext, stop: threading.Event, *, interval: float = 0.5,
                  max_batch: int = DEFAULT_BATCH) -> None:
    """Loop until ``stop`` is set: sequence, then sleep ``interval`` when caught up."""
    while not stop.is_set():
        try:
            res = sequence_once(ctx, max_batch=max_batch)
            if res.more:
                continue
        except Exception:
            log.exception("transparency log sequencer pass failed; retrying")
        stop.wait(interval)


@dataclass
class SequencerThread:
    """A background sequencer (daemon thread); ``stop()`` ends it and waits for it."""

    thread: threading.Thread
    event: threading.Event

    def stop(self, timeout: float = 10.0) -> None:
        self.event.set()
        self.thread.join(timeout)


def start_sequencer(ctx: ServiceContext, *, interval: float = 0.5) -> SequencerThread:
    """Start :func:`run_sequencer` in a daemon thread (one per server process is fine)."""
    event = threading.Event()
    thread = threading.Thread(target=run_sequencer, args=(ctx, event),
                              kwargs={"interval": interval}, name="fleettrust-ledger",
                              daemon=True)
    thread.start()
    return SequencerThread(thread, event)


# --- read side ------------------------------------------------------------------------------------


def _key_row(s: Session, key_id: str) -> LogKey:
    key = s.get(LogKey, key_id)
    if key is None:  # pragma: no cover - foreign key
        raise LedgerCorruptError(f"log key {key_id} missing")
    return key


def latest_sth(ctx: ServiceContext, tree_size: int | None = None) -> SignedTreeHead:
    """The newest signed tree head (of ``tree_size`` leaves, when given)."""
    with ctx.sessions() as s:
        q = select(LogSth).order_by(LogSth.id.desc()).limit(1)
        if tree_size is not None:
            q = q.where(LogSth.tree_size == tree_size)
        row = s.scalars(q).first()
        if row is None:
            if tree_size is None:
                raise NotFoundError("the log has no signed tree head yet (is the sequencer "
                                    "running?)", code="no_tree_head")
            raise NotFoundError(f"no tree head was signed at size {tree_size}",
                                code="tree_size_unknown")
        return _sth_of(row, _key_row(s, row.key_id))


def public_key_pem(ctx: ServiceContext) -> tuple[bytes, bytes]:
    """The active log key (PEM SubjectPublicKeyInfo) and its log id."""
    with ctx.sessions() as s:
        key = _active_key(s)
        if key is None:
            raise NotFoundError("the log has no key yet (is the sequencer running?)",
                                code="no_log_key")
        pub = _public_key(key)
        return (pub.public_bytes(serialization.Encoding.PEM,
                                 serialization.PublicFormat.SubjectPublicKeyInfo),
                bytes.fromhex(key.log_id_hex))


def _default_size(s: Session, tree_size: int | None) -> int:
    if tree_size is not None:
        return tree_size
    row = _latest_sth_row(s)
    if row is None:
        raise NotFoundError("the log has no signed tree head yet", code="no_tree_head")
    return row.tree_size


def inclusion_proof(ctx: ServiceContext, *, leaf_index: int | None = None,
                    leaf_hash: bytes | None = None, serial: str | None = None,
                    tree_size: int | None = None) -> InclusionProof:
    """Proof that a leaf (by index, by leaf hash or by certificate serial) is in the tree of
    ``tree_size`` leaves (default: the latest STH's size)."""
    if sum(x is not None for x in (leaf_index, leaf_hash, serial)) != 1:
        raise ValidationError("give exactly one of leaf_index, leaf_hash, serial",
                              code="bad_proof_request")
    with ctx.sessions() as s:
        size = _default_size(s, tree_size)
        if leaf_hash is not None:
            found = s.scalar(select(func.min(LogLeaf.leaf_index))
                             .where(LogLeaf.leaf_hash == leaf_hash))
            if found is None:
                raise NotFoundError("no leaf with that hash is in the log",
                                    code="leaf_not_found")
            leaf_index = int(found)
        elif serial is not None:
            found = s.scalar(select(LogCertificate.leaf_index)
                             .where(LogCertificate.serial_hex == serial.lower()))
            if found is None:
                raise NotFoundError(f"certificate {serial} is not in the log",
                                    code="certificate_not_logged")
            leaf_index = int(found)
        assert leaf_index is not None
        store = LedgerStore(s)
        if leaf_index >= size:
            raise NotFoundError(f"leaf {leaf_index} is not in the tree of size {size}",
                                code="leaf_not_in_tree")
        path, lh = store.inclusion_proof_and_leaf(leaf_index, size)
        return InclusionProof(leaf_index, size, tuple(path), lh)


def consistency_proof(ctx: ServiceContext, first: int, second: int | None = None
                      ) -> ConsistencyProof:
    with ctx.sessions() as s:
        second = _default_size(s, second)
        return ConsistencyProof(first, second,
                                tuple(LedgerStore(s).consistency_proof(first, second)))


def _entry_view(leaf: LogLeaf) -> dict[str, Any]:
    data = bytes(leaf.data)
    return {"leaf_index": int(leaf.leaf_index), "leaf_hash": b64(bytes(leaf.leaf_hash)),
            "leaf_data": b64(data), "entry": entries.decode_entry(data)}


def get_entries(ctx: ServiceContext, principal: Principal, start: int,
                end: int) -> list[dict[str, Any]]:
    """Leaves ``start..end`` inclusive (RFC 6962 ``get-entries``), at most 1,000."""
    require(principal, *READ_ROLES)
    if start < 0 or end < start:
        raise ValidationError("need 0 <= start <= end", code="bad_range")
    end = min(end, start + MAX_ENTRIES_PAGE - 1)
    with ctx.sessions() as s:
        rows = s.scalars(select(LogLeaf).where(LogLeaf.leaf_index >= start,
                                               LogLeaf.leaf_index <= end)
                         .order_by(LogLeaf.leaf_index)).all()
        return [_entry_view(r) for r in rows]


def device_history(ctx: ServiceContext, principal: Principal, device_id: str) -> dict[str, Any]:
    """Every leaf about a device, oldest first, each with its inclusion proof against the
    latest STH; audit events not yet sequenced are listed under ``pending``."""
    require(principal, *HISTORY_ROLES)
    with ctx.sessions() as s:
        d = s.get(Device, device_id)
        if d is None or (principal.role == "device-owner" and d.owner != principal.subject):
            raise NotFoundError(f"device {device_id} not found", code="device_not_found")
        check_factory_scope(principal, d.factory_id)
        sth_row = _latest_sth_row(s)
        if sth_row is None:
            raise NotFoundError("the log has no signed tree head yet", code="no_tree_head")
        sth = _sth_of(sth_row, _key_row(s, sth_row.key_id))
        rows = s.scalars(select(LogLeaf).where(LogLeaf.device_id == device_id,
                                               LogLeaf.leaf_index < sth.tree_size)
                         .order_by(LogLeaf.leaf_index)).all()
        proofs = LedgerStore(s).inclusion_proofs([r.leaf_index for r in rows], sth.tree_size)
        events = []
        for r in rows:
            view = _entry_view(r)
            view["inclusion_proof"] = InclusionProof(
                r.leaf_index, sth.tree_size, tuple(proofs[r.leaf_index]),
                bytes(r.leaf_hash)).to_json()
            events.append(view)
        last_id = LedgerStore(s).last_event_id()
        pending = [
            {"id": e.id, "occurred_at": e.occurred_at.isoformat(), "action": e.action,
             "actor": e.actor}
            for e in s.scalars(select(AuditEvent).where(
                AuditEvent.id > last_id, AuditEvent.target_type == "device",
                AuditEvent.target_id == device_id).order_by(AuditEvent.id).limit(1000))
        ]
        return {"device_id": device_id, "sth": sth.to_json(), "events": events,
                "pending": pending}


# --- checks ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LogCheck:
    tree_size: int
    root_hash: bytes
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_log(ctx: ServiceContext, *, page: int = 20_000) -> LogCheck:
    """Recompute the whole tree from the stored leaf bytes and compare it with the stored
    hashes and every signed tree head (signatures included). Reads every leaf: an audit tool,
    not a request handler."""
    problems: list[str] = []
    tree = merkle.MemoryTree()
    with ctx.sessions() as s:
        start = 0
        while True:
            rows = s.execute(select(LogLeaf.leaf_index, LogLeaf.leaf_hash, LogLeaf.data)
                             .where(LogLeaf.leaf_index >= start)
                             .order_by(LogLeaf.leaf_index).limit(page)).all()
            if not rows:
                break
            hashes: list[bytes] = []
            for i, h, data in rows:
                if i != start + len(hashes):
                    problems.append(f"leaf index {start + len(hashes)} is missing")
                computed = merkle.leaf_hash(bytes(data))
                if computed != bytes(h):
                    problems.append(f"leaf {i}: stored data hashes to {computed.hex()}, the "
                                    f"stored leaf hash is {bytes(h).hex()} (entry tampered)")
                hashes.append(computed)
            tree.extend(hashes)
            start = int(rows[-1][0]) + 1
        size = tree.size
        store = LedgerStore(s)
        try:
            stored_root = store.root(size)
            if stored_root != tree.root():
                problems.append(f"stored subtree hashes give root {stored_root.hex()}, the "
                                f"leaves give {tree.root().hex()}")
        except LedgerCorruptError as exc:
            problems.append(str(exc))
        keys = {k.id: k for k in s.scalars(select(LogKey))}
        for row in s.scalars(select(LogSth).order_by(LogSth.id)):
            key = keys[row.key_id]
            sth = _sth_of(row, key)
            try:
                verify_sth(sth, _public_key(key))
            except TreeHeadError as exc:
                problems.append(str(exc))
            if sth.tree_size > size:
                problems.append(f"tree head of size {sth.tree_size} but only {size} leaves")
            elif tree.root(sth.tree_size) != sth.root_hash:
                problems.append(f"tree head {row.id} (size {sth.tree_size}) signs root "
                                f"{sth.root_hash.hex()}, the leaves give "
                                f"{tree.root(sth.tree_size).hex()}")
    return LogCheck(size, tree.root(), tuple(problems))


def unlogged(ctx: ServiceContext) -> dict[str, list[Any]]:
    """Audit events below the log's horizon that no leaf accounts for, and certificates no leaf
    carries. Full scans: an audit tool. Empty lists mean the log is complete."""
    with ctx.sessions() as s:
        store = LedgerStore(s)
        horizon = store.last_event_id()
        gaps = [entries.decode_entry(bytes(d)) for d in
                s.scalars(select(LogLeaf.data).where(LogLeaf.kind == entries.KIND_GAP))]
        logged = cast(set[int], set(s.scalars(select(LogLeaf.audit_event_id)
                                              .where(LogLeaf.audit_event_id.is_not(None)))))
        for g in gaps:
            logged.update(range(int(g["first_id"]), int(g["last_id"]) + 1))
        ids = s.scalars(select(AuditEvent.id).where(AuditEvent.id <= horizon)).all()
        missing_events = sorted(set(ids) - logged)
        missing_certs = list(s.scalars(
            select(Certificate.serial_hex).outerjoin(
                LogCertificate, LogCertificate.serial_hex == Certificate.serial_hex)
            .where(LogCertificate.serial_hex.is_(None)).order_by(Certificate.created_at)))
        return {"events": missing_events, "certificates": missing_certs}


def leaf_count(ctx: ServiceContext) -> int:
    with ctx.sessions() as s:
        return LedgerStore(s).size()


def require_log_key(ctx: ServiceContext) -> ec.EllipticCurvePublicKey:
    with ctx.sessions() as s:
        key = _active_key(s)
        if key is None:
            raise ConflictError("the log has no key yet", code="no_log_key")
        return _public_key(key)
