"""The in-memory revocation status index: serial -> revoked / on hold, in O(1), in every process.

The index replays the ``revocations`` log (``seq`` order) into a dict. :meth:`RevocationIndex.load`
reads it whole at start; :meth:`RevocationIndex.sync` reads only rows with ``seq > last_seq``.
Revocation writers are serialised (``services.revocation``), so rows become visible in ``seq``
order and following ``seq > last`` never skips a row that commits late. A revocation made through
another process on the same database is therefore seen on the next sync; :func:`follow` syncs
every ``interval`` seconds (0.1 s by default) from an asyncio task.

Large syncs are applied chunk by chunk as they are read, so the first serials of a 100,000-row
batch revocation answer "revoked" before the last ones are read. Subscribers are called after
each sync that found new events, with those events, from the thread that ran the sync.

**Rules.** A large operation (a batch, a factory, a breach window) is in force from the commit of
its decision, before its per-certificate rows are written (``services.revocation``). The index
therefore also loads every decided revoke operation as a *rule* (revoked CAs, batches,
factories, devices, windows of issuing CAs) and :meth:`RevocationIndex.check` answers for a
certificate whose issuing CA, batch, factory and issuance time the caller knows (the gateway
does). :meth:`status` answers from per-certificate rows only, which follow within seconds.

Not here: deciding what to revoke (``services.revocation``), CRLs, OCSP, the device feed. The
index holds only revoked / held serials; "good" and "unknown" (never issued) are not told apart
(``status`` returns ``None`` for both): callers that need "unknown" look the certificate up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import BigInteger, Integer, bindparam, func, select

from fleettrust.revocation import rawread
from fleettrust.revocation.models import RevocationOperation
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import Revocation

log = logging.getLogger("fleettrust.revocation.index")
_CHUNK: Final = 20_000


@dataclass(frozen=True, slots=True)
class CertStatus:
    """Why a serial is not good: ``status`` is ``"revoked"`` or ``"hold"``.

    ``seq`` is the log position of the entry; answers derived from a rule (:meth:`check`) have
    ``seq == 0`` and the deciding ``operation_id``.
    """

    status: str
    reason: str | None
    revoked_at: dt.datetime
    seq: int
    operation_id: str | None = None


@dataclass(frozen=True, slots=True)
class RevocationRule:
    """A decided revoke operation, as the index evaluates it (see the module docstring)."""

    operation_id: str
    op_seq: int
    scope: str  # device | batch | factory | window
    target_id: str
    ca_ids: tuple[str, ...]  # every leaf issued by these CAs
    batch_id: str | None  # every device of this batch (batches without their own CA)
    factory_id: str | None  # every device of this factory
    leaf_ca_ids: tuple[str, ...]  # window: leaves of these CAs issued in [after, before)
    issued_after: dt.datetime | None
    issued_before: dt.datetime | None
    status: CertStatus


@dataclass(frozen=True, slots=True)
class RevocationEvent:
    """One row of the revocation log. ``action`` is ``revoke``, ``hold`` or ``release``."""

    seq: int
    serial_hex: str
    ca_id: str
    device_id: str | None
    action: str
    reason: str | None
    revoked_at: dt.datetime
    operation_id: str


_STATUS_OF_ACTION: Final = {"revoke": "revoked", "hold": "hold"}


class RevocationIndex:
    """Revoked and held serials of one database, kept current by :meth:`sync`.

    ``status`` is safe to call from any thread while another thread syncs (single dict reads
    and writes are atomic in CPython); ``load`` and ``sync`` are serialised by a lock.
    """

    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._entries: dict[str, CertStatus] = {}
        self._last_seq = 0
        self._loaded = False
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[list[RevocationEvent]], None]] = []
        self._rule_subscribers: list[Callable[[list[RevocationRule]], None]] = []
        self._last_op_seq = 0
        self._rules: list[RevocationRule] = []
        self._by_ca: dict[str, CertStatus] = {}
        self._by_batch: dict[str, CertStatus] = {}
        self._by_factory: dict[str, CertStatus] = {}
        self._by_device: dict[str, CertStatus] = {}
        self._windows: dict[str, list[RevocationRule]] = {}

    # --- reading ---------------------------------------------------------------------------

    def status(self, serial_hex: str) -> CertStatus | None:
        """``None``: not revoked and not on hold (as of the last sync). ``serial_hex`` is
        lower-case hex without leading zeros, as ``format(serial, "x")`` gives."""
        return self._entries.get(serial_hex)

    def check(
        self,
        serial_hex: str | None,
        *,
        ca_id: str | None = None,
        batch_id: str | None = None,
        factory_id: str | None = None,
        device_id: str | None = None,
        issued_at: dt.datetime | None = None,
    ) -> CertStatus | None:
        """Status of one certificate from its own entry *and* every rule that covers it, in
        O(1) (plus the few breach windows of its issuing CA). A revocation beats a hold.

        Give whatever is known: ``ca_id`` (issuing CA), the device's ``batch_id``,
        ``factory_id`` and ``device_id``, and ``issued_at`` (``certificates.created_at``).
        ``serial_hex`` may be ``None`` for a device without certificate (shared secret).
        """
        entry = self._entries.get(serial_hex) if serial_hex is not None else None
        if entry is not None and entry.status == "revoked":
            return entry
        rule: CertStatus | None = None
        if ca_id is not None:
            rule = self._by_ca.get(ca_id)
            if rule is None and issued_at is not None:
                for w in self._windows.get(ca_id, ()):
                    if ((w.issued_after is None or issued_at >= w.issued_after)
                            and (w.issued_before is None or issued_at < w.issued_before)):
                        rule = w.status
                        break
        if rule is None and batch_id is not None:
            rule = self._by_batch.get(batch_id)
        if rule is None and factory_id is not None:
            rule = self._by_factory.get(factory_id)
        if rule is None and device_id is not None:
            rule = self._by_device.get(device_id)
        return rule or entry

    def rules(self) -> list[RevocationRule]:
        return list(self._rules)

    def subscribe_rules(self, callback: Callable[[list[RevocationRule]], None]) -> None:
        """``callback(new_rules)`` after each sync that loaded newly decided operations."""
        self._rule_subscribers.append(callback)

    @property
    def last_seq(self) -> int:
        return self._last_seq

    @property
    def last_op_seq(self) -> int:
        return self._last_op_seq

    @property
    def loaded(self) -> bool:
        return self._loaded

    def __len__(self) -> int:
        return len(self._entries)

    def snapshot(self) -> dict[str, CertStatus]:
        """A copy of every non-good serial (for CRL building and tests)."""
        return dict(self._entries)

    def subscribe(self, callback: Callable[[list[RevocationEvent]], None]) -> None:
        self._subscribers.append(callback)

    # --- updating ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the whole log and replace the index with it."""
        with self._lock:
            self._entries = {}
            self._last_seq = 0
            self._read_rules()
            self._read(collect=False)
            self._loaded = True

    def sync(self) -> list[RevocationEvent]:
        """Apply and return every event with ``seq > last_seq`` (all of the log on first use).

        Newly decided operations are loaded as rules first (and passed to rule subscribers).
        """
        with self._lock:
            rules = self._read_rules()
            if not self._loaded:
                self._read(collect=False)
                self._loaded = True
                events: list[RevocationEvent] = []
            else:
                events = self._read(collect=True)
        if rules:
            for rule_callback in list(self._rule_subscribers):
                try:
                    rule_callback(rules)
                except Exception:
                    log.exception("revocation rule subscriber %r failed", rule_callback)
        if events:
            for callback in list(self._subscribers):
                try:
                    callback(events)
                except Exception:
                    log.exception("revocation index subscriber %r failed", callback)
        return events

    def _read_rules(self) -> list[RevocationRule]:
        stmt = (select(RevocationOperation.seq, RevocationOperation.id,
                       RevocationOperation.scope, RevocationOperation.target_id,
                       RevocationOperation.reason, RevocationOperation.revoked_at,
                       RevocationOperation.batch_id, RevocationOperation.factory_id,
                       RevocationOperation.ca_ids, RevocationOperation.leaf_ca_ids,
                       RevocationOperation.issued_after, RevocationOperation.issued_before)
                .where(RevocationOperation.seq > bindparam("after", type_=BigInteger()),
                       RevocationOperation.action == "revoke")
                .order_by(RevocationOperation.seq))
        rows = self._fetch(stmt, {"after": self._last_op_seq})
        if not rows:
            return []
        new_rules = [self._rule_of(r) for r in rows]
        for rule in new_rules:
            self._add_rule(rule)
        self._last_op_seq = new_rules[-1].op_seq
        return new_rules

    def _fetch(self, stmt: Any, params: dict[str, Any]) -> list[Any]:
        """Outside any SQLAlchemy transaction: never waits for a writer (see ``rawread``)."""
        return rawread.fetch(self._ctx, stmt, params)

    @staticmethod
    def _rule_of(row: Any) -> RevocationRule:
        (seq, op_id, scope, target, reason, revoked_at, batch_id, factory_id, ca_ids,
         leaf_ca_ids, after, before) = row
        ca_list = json.loads(ca_ids) if isinstance(ca_ids, str) else list(ca_ids or [])
        leaf_list = (json.loads(leaf_ca_ids) if isinstance(leaf_ca_ids, str)
                     else list(leaf_ca_ids or []))
        status = CertStatus("revoked", reason, _to_utc(revoked_at), 0, op_id)
        return RevocationRule(
            operation_id=op_id, op_seq=int(seq), scope=scope, target_id=target,
            ca_ids=tuple(ca_list), batch_id=batch_id if not ca_list else None,
            factory_id=factory_id, leaf_ca_ids=tuple(leaf_list),
            issued_after=_to_utc(after) if after is not None else None,
            issued_before=_to_utc(before) if before is not None else None, status=status)

    def _add_rule(self, rule: RevocationRule) -> None:
        self._rules.append(rule)
        for ca in rule.ca_ids:
            self._by_ca.setdefault(ca, rule.status)
        if rule.batch_id is not None:
            self._by_batch.setdefault(rule.batch_id, rule.status)
        if rule.factory_id is not None:
            self._by_factory.setdefault(rule.factory_id, rule.status)
        if rule.scope == "device":
            self._by_device.setdefault(rule.target_id, rule.status)
        for ca in rule.leaf_ca_ids:
            self._windows.setdefault(ca, []).append(rule)

    def _read(self, *, collect: bool) -> list[RevocationEvent]:
        """Read and apply the log after ``last_seq`` in chunks. Straight from the driver's
        cursor: SQLAlchemy's row processing cost more than everything else for 100,000 rows."""
        collected: list[RevocationEvent] = []
        stmt = (select(Revocation.seq, Revocation.serial_hex, Revocation.ca_id,
                       Revocation.device_id, Revocation.action, Revocation.reason,
                       Revocation.revoked_at, Revocation.operation_id)
                .where(Revocation.seq > bindparam("after", type_=BigInteger()))
                .order_by(Revocation.seq).limit(bindparam("lim", type_=Integer())))
        times: dict[Any, dt.datetime] = {}
        while True:
            raw = self._fetch(stmt, {"after": self._last_seq, "lim": _CHUNK})
            if not raw:
                return collected
            rows = [(r[0], r[1], r[2], r[3], r[4], r[5],
                     times.get(r[6]) or times.setdefault(r[6], _to_utc(r[6])), r[7])
                    for r in raw]
            self._apply(rows)
            if collect:
                collected.extend(RevocationEvent(*r) for r in rows)
            if len(rows) < _CHUNK:
                return collected

    def _apply(self, rows: Iterable[tuple[int, str, str, str | None, str, str | None,
                                          dt.datetime, str]]) -> None:
        entries = self._entries
        seq = self._last_seq
        for seq, serial, _ca, _dev, action, reason, revoked_at, _op in rows:
            status = _STATUS_OF_ACTION.get(action)
            if status is None:  # release: the hold is lifted
                entries.pop(serial, None)
            else:
                entries[serial] = CertStatus(status, reason, revoked_at, seq)
        self._last_seq = seq

    def max_seq_in_database(self) -> int:
        with self._ctx.sessions() as session:
            return int(session.scalar(select(func.max(Revocation.seq))) or 0)


def _to_utc(value: Any) -> dt.datetime:
    """A driver's timestamp (SQLite: text without zone, stored in UTC) as an aware UTC value."""
    parsed = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed.astimezone(dt.UTC)


async def follow(index: RevocationIndex, interval: float = 0.1) -> None:
    """Keep ``index`` current: sync in a worker thread every ``interval`` seconds, forever.

    Errors (database unreachable) are logged and retried; cancel the task to stop.
    """
    while True:
        try:
            await asyncio.to_thread(index.sync)
        except Exception:
            log.exception("revocation index sync failed; retrying")
        await asyncio.sleep(interval)


__all__ = ["CertStatus", "RevocationEvent", "RevocationIndex", "RevocationRule", "follow"]
