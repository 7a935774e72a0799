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

Not here: deciding what to revoke (``services.revocation``), CRLs, OCSP, the device feed. The
index holds only revoked / held serials; "good" and "unknown" (never issued) are not told apart
(``status`` returns ``None`` for both): callers that need "unknown" look the certificate up.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from sqlalchemy import func, select

from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import Revocation

log = logging.getLogger("fleettrust.revocation.index")
_CHUNK: Final = 20_000


@dataclass(frozen=True, slots=True)
class CertStatus:
    """Why a serial is not good: ``status`` is ``"revoked"`` or ``"hold"``."""

    status: str
    reason: str | None
    revoked_at: dt.datetime
    seq: int


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

    # --- reading ---------------------------------------------------------------------------

    def status(self, serial_hex: str) -> CertStatus | None:
        """``None``: not revoked and not on hold (as of the last sync). ``serial_hex`` is
        lower-case hex without leading zeros, as ``format(serial, "x")`` gives."""
        return self._entries.get(serial_hex)

    @property
    def last_seq(self) -> int:
        return self._last_seq

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
            self._read(collect=False)
            self._loaded = True

    def sync(self) -> list[RevocationEvent]:
        """Apply and return every event with ``seq > last_seq`` (all of the log on first use)."""
        with self._lock:
            if not self._loaded:
                self._read(collect=False)
                self._loaded = True
                events: list[RevocationEvent] = []
            else:
                events = self._read(collect=True)
        if events:
            for callback in list(self._subscribers):
                try:
                    callback(events)
                except Exception:
                    log.exception("revocation index subscriber %r failed", callback)
        return events

    def _read(self, *, collect: bool) -> list[RevocationEvent]:
        collected: list[RevocationEvent] = []
        cols = (Revocation.seq, Revocation.serial_hex, Revocation.ca_id, Revocation.device_id,
                Revocation.action, Revocation.reason, Revocation.revoked_at,
                Revocation.operation_id)
        while True:
            with self._ctx.sessions() as session:
                rows = session.execute(
                    select(*cols).where(Revocation.seq > self._last_seq)
                    .order_by(Revocation.seq).limit(_CHUNK)
                ).all()
            if not rows:
                return collected
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


__all__ = ["CertStatus", "RevocationEvent", "RevocationIndex", "follow"]
