"""The device revocation feed: pages of the ``revocations`` log after a sequence number.

Agents keep the ``seq`` of the last event they applied and ask for ``since=N``; the server answers
with a bounded page of the events after ``N`` and the ``next`` value to ask for. Two wire formats,
both served forever (an agent pinned to ``v1`` keeps working after newer formats are added):

``v1`` — plain JSON, one object per event::

    {"format": "v1", "since": 0, "next": 2, "head": 2, "more": false,
     "snapshot_required": false,
     "events": [{"seq": 1, "serial": "5f..", "ca_id": "ca_..", "action": "revoke",
                 "reason": "keyCompromise", "revoked_at": "2026-11-24T14:00:00Z"}, ...]}

``v2`` — the same envelope with the events packed (about 24 bytes an event instead of ~170)::

    {"format": "v2", "since": 0, "next": 2, "head": 2, "more": false,
     "snapshot_required": false, "count": 2, "t0": 1795000000,
     "cas": ["ca_..", ...], "reasons": ["keyCompromise", ...], "packed": "<base64>"}

  ``packed`` is, per event: varint(seq - previous seq, starting from ``since``), one action byte
  (0 revoke, 1 hold, 2 release), varint(reason index + 1, 0 = none), varint(ca index),
  zigzag varint(revoked_at seconds - previous, starting from ``t0``), one length byte and the
  serial's big-endian bytes. Times have one-second precision.

Serials are lower-case hex without leading zeros (``format(serial, "x")``), as everywhere else.

An agent more than ``MAX_LAG`` events behind (or claiming a position the server never reached)
gets ``snapshot_required: true`` and no events: it fetches the compact snapshot
(:mod:`fleettrust.revocation.filter`) and follows the feed from the snapshot's ``seq``.

The log's ``seq`` becomes visible in order (revocation writers are serialised, see
:mod:`fleettrust.revocation.index`), so ``seq > N`` never skips a late commit.

Not here: HTTP (``api.feed_routes``), the snapshot (``revocation.filter``), push
(``api.feed_routes`` for SSE, ``revocation.mqtt``).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleettrust.errors import ValidationError
from fleettrust.storage.models import Revocation

FORMATS: Final = ("v1", "v2")
DEFAULT_LIMIT: Final = 1000
MAX_LIMIT: Final = 5000
MAX_LAG: Final = 20_000  # events; further behind than this, the snapshot is cheaper
ACTIONS: Final = ("revoke", "hold", "release")
SNAPSHOT_PATH: Final = "/v1/revocations/snapshot"


@dataclass(frozen=True, slots=True)
class FeedEvent:
    """One event as agents see it (no device id, no operation id: the feed is public)."""

    seq: int
    serial_hex: str
    ca_id: str
    action: str  # revoke | hold | release
    reason: str | None
    revoked_at: dt.datetime


@dataclass(frozen=True, slots=True)
class FeedPage:
    since: int
    next: int
    head: int
    more: bool
    snapshot_required: bool
    events: tuple[FeedEvent, ...]


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValidationError(f"format must be one of {', '.join(FORMATS)}",
                              code="feed_format_unknown")
    return fmt


def head_seq(session: Session) -> int:
    return int(session.scalar(select(func.max(Revocation.seq))) or 0)


def _rows_to_events(rows: Iterable[Any]) -> tuple[FeedEvent, ...]:
    return tuple(FeedEvent(int(r[0]), r[1], r[2], r[3], r[4], r[5]) for r in rows)


def events_after(session: Session, since: int, limit: int) -> tuple[FeedEvent, ...]:
    """Up to ``limit`` events with ``seq > since`` in ``seq`` order."""
    rows = session.execute(
        select(Revocation.seq, Revocation.serial_hex, Revocation.ca_id, Revocation.action,
               Revocation.reason, Revocation.revoked_at)
        .where(Revocation.seq > since).order_by(Revocation.seq).limit(limit)
    ).all()
    return _rows_to_events(rows)


def read_page(session: Session, since: int, limit: int = DEFAULT_LIMIT, *,
              max_lag: int | None = None) -> FeedPage:
    """The page after ``since``, or ``snapshot_required`` if the agent is too far behind
    (more than ``max_lag`` events, default :data:`MAX_LAG`)."""
    max_lag = MAX_LAG if max_lag is None else max_lag
    if since < 0:
        raise ValidationError("since must be >= 0", code="feed_since_invalid")
    limit = max(1, min(limit, MAX_LIMIT))
    head = head_seq(session)
    if since > head or head - since > max_lag:
        return FeedPage(since, since, head, False, True, ())
    if since == head:
        return FeedPage(since, since, head, False, False, ())
    events = events_after(session, since, limit)
    nxt = events[-1].seq if events else since
    return FeedPage(since, nxt, head, nxt < head, False, events)


# --- v1 --------------------------------------------------------------------------------------


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def event_v1(e: FeedEvent) -> dict[str, Any]:
    return {"seq": e.seq, "serial": e.serial_hex, "ca_id": e.ca_id, "action": e.action,
            "reason": e.reason, "revoked_at": iso(e.revoked_at)}


def _envelope(fmt: str, page: FeedPage) -> dict[str, Any]:
    doc: dict[str, Any] = {"format": fmt, "since": page.since, "next": page.next,
                           "head": page.head, "more": page.more,
                           "snapshot_required": page.snapshot_required}
    if page.snapshot_required:
        doc["snapshot"] = SNAPSHOT_PATH
    return doc


def page_v1(page: FeedPage) -> dict[str, Any]:
    doc = _envelope("v1", page)
    doc["events"] = [event_v1(e) for e in page.events]
    return doc


def parse_time(value: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError("time without zone")
    return t.astimezone(dt.UTC)


def decode_v1(doc: dict[str, Any]) -> list[FeedEvent]:
    out: list[FeedEvent] = []
    for item in doc["events"]:
        action = str(item["action"])
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        out.append(FeedEvent(int(item["seq"]), _canonical_serial(str(item["serial"])),
                             str(item["ca_id"]), action,
                             None if item.get("reason") is None else str(item["reason"]),
                             parse_time(str(item["revoked_at"]))))
    return out


def _canonical_serial(serial_hex: str) -> str:
    return format(int(serial_hex, 16), "x")


# --- v2 --------------------------------------------------------------------------------------


def _varint(out: bytearray, n: int) -> None:
    if n < 0:
        raise ValueError("varint of a negative number")
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return


def _zigzag(n: int) -> int:
    return n * 2 if n >= 0 else -n * 2 - 1


def _unzigzag(n: int) -> int:
    return n >> 1 if not n & 1 else -((n + 1) >> 1)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("packed events truncated")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        n = shift = 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 70:
                raise ValueError("varint too long")

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("packed events truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk


def pack_events(events: Sequence[FeedEvent], since: int) -> dict[str, Any]:
    """The v2 body fields of ``events`` (``count``, ``t0``, ``cas``, ``reasons``, ``packed``)."""
    cas: dict[str, int] = {}
    reasons: dict[str, int] = {}
    out = bytearray()
    t0 = int(events[0].revoked_at.timestamp()) if events else 0
    prev_seq, prev_t = since, t0
    for e in events:
        _varint(out, e.seq - prev_seq)
        out.append(ACTIONS.index(e.action))
        _varint(out, 0 if e.reason is None else reasons.setdefault(e.reason, len(reasons)) + 1)
        _varint(out, cas.setdefault(e.ca_id, len(cas)))
        t = int(e.revoked_at.timestamp())
        _varint(out, _zigzag(t - prev_t))
        serial = int(e.serial_hex, 16)
        raw = serial.to_bytes(max(1, (serial.bit_length() + 7) // 8), "big")
        out.append(len(raw))
        out += raw
        prev_seq, prev_t = e.seq, t
    return {"count": len(events), "t0": t0, "cas": list(cas), "reasons": list(reasons),
            "packed": base64.b64encode(bytes(out)).decode()}


def page_v2(page: FeedPage) -> dict[str, Any]:
    doc = _envelope("v2", page)
    doc.update(pack_events(page.events, page.since))
    return doc


def decode_v2(doc: dict[str, Any]) -> list[FeedEvent]:
    cas = [str(c) for c in doc["cas"]]
    reasons = [str(r) for r in doc["reasons"]]
    r = _Reader(base64.b64decode(doc["packed"], validate=True))
    prev_seq, prev_t = int(doc["since"]), int(doc["t0"])
    out: list[FeedEvent] = []
    for _ in range(int(doc["count"])):
        seq = prev_seq + r.varint()
        action = ACTIONS[r.byte()]
        ri = r.varint()
        reason = None if ri == 0 else reasons[ri - 1]
        ca_id = cas[r.varint()]
        t = prev_t + _unzigzag(r.varint())
        serial = int.from_bytes(r.take(r.byte()), "big")
        out.append(FeedEvent(seq, format(serial, "x"), ca_id, action, reason,
                             dt.datetime.fromtimestamp(t, dt.UTC)))
        prev_seq, prev_t = seq, t
    if r.pos != len(r.data):
        raise ValueError("trailing bytes after the packed events")
    return out


def render(page: FeedPage, fmt: str) -> dict[str, Any]:
    return page_v1(page) if check_format(fmt) == "v1" else page_v2(page)


def decode(doc: dict[str, Any]) -> list[FeedEvent]:
    """Events of a feed document of any known format (agent side)."""
    fmt = doc.get("format")
    if fmt == "v1":
        return decode_v1(doc)
    if fmt == "v2":
        return decode_v2(doc)
    raise ValueError(f"unknown feed format {fmt!r}")


def dumps(doc: dict[str, Any]) -> bytes:
    """Compact JSON (what goes on the wire: HTTP bodies, SSE data lines, MQTT payloads)."""
    return json.dumps(doc, separators=(",", ":")).encode()
