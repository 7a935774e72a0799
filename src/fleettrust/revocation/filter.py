"""The compact revocation snapshot: an exact filter over the device serials the fleet issued.

The platform knows every device certificate it issued (the *universe*), so the snapshot can answer
"revoked?" with no false answer for any of them - CRLite's idea. CRLite first used a cascade of
Bloom filters; Firefox's current CRLite uses *Clubcard* (partitioned Ribbon filters), which sits
within a few percent of the information-theoretic minimum. This module is a two-level cascade of
Ribbon retrieval filters in that spirit (see docs/adr/0010-revocation-feed-and-filter.md for the
measurements that decided it):

* level A, an approximate-membership filter for the revoked set ``R``: a solution ``Z`` (``f``
  bits per slot) of one linear equation over GF(2) per revoked serial, "the XOR of the slots this
  serial hashes to equals its ``f``-bit fingerprint". A good serial matches with probability
  ``2^-f``. ``f`` is chosen to minimise the total size (``f = 0``: no level A).
* level B, an exact 1-bit retrieval filter over ``R`` plus the good serials level A wrongly
  matches: 1 for revoked, 0 for good.

Lookup: level A says no -> good; otherwise level B's bit. Exact for every serial of the universe;
a serial outside it gets an arbitrary answer. The equations are solved with banded Gaussian
elimination ("standard Ribbon", Dillinger & Walzer 2021; band width 128 bits, 4 % spare slots).

The universe of a snapshot is every device certificate whose ``notBefore`` is at or before the
snapshot's ``cutoff`` (an hour before it was built, so issuance transactions still in flight are
never half-included). Revoked serials outside the universe (issued after the cutoff, CA
certificates) are listed explicitly. An agent asks the filter only for certificates with
``notBefore <= cutoff``; for newer ones the explicit list and the feed after ``seq`` are the truth.

Binary format, version 1 (integers big-endian)::

    magic "FTRC" | version u8 (1) | algorithm u8 (2 = two-level Ribbon, BLAKE2b) | flags u16 (0)
    seq u64 (revocation log position covered) | cutoff i64 (unix s) | generated_at i64 (unix s)
    universe u32 | revoked u32 | salt 16 bytes
    level A: slots u32 | f u8 | f bit-planes of ceil(slots/8) bytes   (slots = 0: absent)
    level B: slots u32 | 1 bit-plane of ceil(slots/8) bytes            (slots = 0: absent)
    exceptions u32 | per exception: length u8 + serial bytes
    crc32 u32 of everything before it

Slot ``i`` of a plane is bit ``i % 8`` of byte ``i // 8``. For level ``L`` (1 = A, 2 = B) a serial
(its minimal big-endian bytes) is hashed with BLAKE2b (32-byte digest, key = salt,
person = b"ftrc-ribbon" + L): bytes 0-7 (little-endian) mod ``slots - 127`` give the start ``s``,
bytes 8-23 (little-endian, lowest bit forced to 1) the 128-bit coefficient ``c``, bytes 24-31 the
fingerprint (its low ``f`` bits). The retrieved value's bit ``p`` is the parity of
``c & plane_p[s : s + 128]``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleettrust.storage.models import Certificate, Revocation

MAGIC: Final = b"FTRC"
VERSION: Final = 1
ALGORITHM_RIBBON2: Final = 2
WIDTH: Final = 128  # ribbon band width (bits)
_WBYTES: Final = WIDTH // 8 + 1
SPARE: Final = 0.04  # extra slots over the number of equations
MAX_ATTEMPTS: Final = 12
UNIVERSE_MARGIN: Final = dt.timedelta(hours=1)
MEDIA_TYPE: Final = "application/vnd.fleettrust.revocation-filter"
_HEADER = struct.Struct(">4sBBHQqqII16s")


class SnapshotFormatError(ValueError):
    """The bytes are not a snapshot this code understands (or are damaged)."""


def serial_bytes(serial_hex: str) -> bytes:
    """Minimal big-endian bytes of a hex serial."""
    n = int(serial_hex, 16)
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def _hash(key: bytes, salt: bytes, level: int, slots: int) -> tuple[int, int, int]:
    d = hashlib.blake2b(key, digest_size=32, key=salt,
                        person=b"ftrc-ribbon" + bytes([level])).digest()
    start = int.from_bytes(d[:8], "little") % (slots - WIDTH + 1)
    coeff = int.from_bytes(d[8:24], "little") | 1
    return start, coeff, int.from_bytes(d[24:], "little")


def _slots_for(n: int, spare: float) -> int:
    return max(WIDTH + 8, math.ceil(n * (1 + spare)))


def _solve(rows: Iterable[tuple[int, int, int]], slots: int) -> list[int] | None:
    """Banded elimination of ``XOR(Z[s + j] for bit j of c) == v``; ``None`` if inconsistent."""
    pc = [0] * slots
    pv = [0] * slots
    for s, c, v in rows:
        while True:
            if c == 0:
                if v:
                    return None
                break
            tz = (c & -c).bit_length() - 1
            c >>= tz
            s += tz
            if pc[s] == 0:
                pc[s] = c
                pv[s] = v
                break
            c ^= pc[s]
            v ^= pv[s]
    z = [0] * slots
    for i in range(slots - 1, -1, -1):
        c = pc[i]
        if c:
            acc = pv[i]
            c >>= 1
            while c:
                low = c & -c
                acc ^= z[i + low.bit_length()]
                c ^= low
            z[i] = acc
    return z


def _planes(z: Sequence[int], bits: int) -> tuple[bytes, ...]:
    out = []
    for p in range(bits):
        plane = bytearray((len(z) + 7) // 8)
        for i, value in enumerate(z):
            if value >> p & 1:
                plane[i >> 3] |= 1 << (i & 7)
        out.append(bytes(plane))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class RibbonLevel:
    """A solved retrieval level: ``bits`` bit-planes of ``slots`` slots."""

    level: int
    slots: int
    planes: tuple[bytes, ...]

    def retrieve(self, key: bytes, salt: bytes) -> tuple[int, int]:
        """(retrieved value, the key's fingerprint) for ``key``."""
        s, c, fp = _hash(key, salt, self.level, self.slots)
        byte, shift = s >> 3, s & 7
        value = 0
        for p, plane in enumerate(self.planes):
            window = int.from_bytes(plane[byte:byte + _WBYTES], "little") >> shift
            value |= ((window & c).bit_count() & 1) << p
        return value, fp

    @property
    def size(self) -> int:
        return sum(len(p) for p in self.planes)


def _build_level(level: int, keys: Sequence[bytes], values: Sequence[int] | None, bits: int,
                 salt: bytes, spare: float) -> RibbonLevel | None:
    slots = _slots_for(len(keys), spare)
    mask = (1 << bits) - 1
    rows = []
    for i, key in enumerate(keys):
        s, c, fp = _hash(key, salt, level, slots)
        rows.append((s, c, (fp & mask) if values is None else values[i]))
    z = _solve(rows, slots)
    return None if z is None else RibbonLevel(level, slots, _planes(z, bits))


def choose_fingerprint_bits(revoked: int, good: int) -> int:
    """``f`` minimising ``f r + (r + s 2^-f)`` slots-bits (0 = level B over everything)."""
    return min(range(17), key=lambda f: (f * revoked + revoked + good / 2 ** f, f))


@dataclass(frozen=True, slots=True)
class RibbonFilter:
    salt: bytes
    a: RibbonLevel | None  # approximate membership of the revoked set (absent if f == 0)
    b: RibbonLevel | None  # exact bit over revoked + level-A false positives (absent if empty)

    def contains(self, key: bytes) -> bool:
        """True iff ``key`` is in the revoked set - exact for every key of the universe."""
        if self.b is None:
            return False
        if self.a is not None:
            value, fp = self.a.retrieve(key, self.salt)
            if value != fp & ((1 << len(self.a.planes)) - 1):
                return False
        return self.b.retrieve(key, self.salt)[0] == 1

    @property
    def size(self) -> int:
        return (self.a.size if self.a else 0) + (self.b.size if self.b else 0)


def build_filter(include: Sequence[bytes], exclude: Sequence[bytes], salt: bytes) -> RibbonFilter:
    """Exact filter: ``True`` for ``include``, ``False`` for ``exclude`` (disjoint key sets)."""
    if not include:
        return RibbonFilter(salt, None, None)
    f = choose_fingerprint_bits(len(include), len(exclude))
    spare = SPARE
    for attempt in range(MAX_ATTEMPTS):
        s = salt if attempt == 0 else hashlib.sha256(salt + bytes([attempt])).digest()[:16]
        if attempt and attempt % 3 == 0:
            spare *= 1.5
        a: RibbonLevel | None = None
        b_keys: list[bytes] = list(include)
        if f:
            a = _build_level(1, include, None, f, s, spare)
            if a is None:
                continue
            mask = (1 << f) - 1
            for key in exclude:
                value, fp = a.retrieve(key, s)
                if value == fp & mask:
                    b_keys.append(key)
        else:  # no level A (mostly revoked): level B answers for the whole universe
            b_keys.extend(exclude)
        b = _build_level(2, b_keys, [1] * len(include) + [0] * (len(b_keys) - len(include)),
                         1, s, spare)
        if b is not None:
            return RibbonFilter(s, a, b)
    raise RuntimeError("ribbon filter did not solve")  # pragma: no cover - p < 1e-9


@dataclass(frozen=True, slots=True)
class Snapshot:
    seq: int
    cutoff: dt.datetime
    generated_at: dt.datetime
    universe: int
    revoked: int
    filter: RibbonFilter
    # revoked serials outside the filter's universe (issued after the cutoff, CA certificates)
    exceptions: frozenset[str]

    def is_revoked(self, serial_hex: str, not_before: dt.datetime | None = None) -> bool:
        """Revoked or on hold as of ``seq``. ``not_before`` (the certificate's) tells whether the
        serial can be in the universe; without it the filter is asked anyway (a certificate
        issued after ``cutoff`` may then get a false "revoked")."""
        canonical = format(int(serial_hex, 16), "x")
        if canonical in self.exceptions:
            return True
        if not_before is not None and not_before > self.cutoff:
            return False
        return self.filter.contains(serial_bytes(canonical))

    def to_bytes(self) -> bytes:
        out = bytearray(_HEADER.pack(
            MAGIC, VERSION, ALGORITHM_RIBBON2, 0, self.seq, int(self.cutoff.timestamp()),
            int(self.generated_at.timestamp()), self.universe, self.revoked, self.filter.salt))
        a, b = self.filter.a, self.filter.b
        out += struct.pack(">IB", a.slots if a else 0, len(a.planes) if a else 0)
        for plane in a.planes if a else ():
            out += plane
        out += struct.pack(">I", b.slots if b else 0)
        if b:
            out += b.planes[0]
        out += struct.pack(">I", len(self.exceptions))
        for s in sorted(self.exceptions):
            raw = serial_bytes(s)
            out.append(len(raw))
            out += raw
        out += struct.pack(">I", zlib.crc32(out))
        return bytes(out)

    @classmethod
    def from_bytes(cls, data: bytes) -> Snapshot:
        try:
            return _parse(data)
        except SnapshotFormatError:
            raise
        except (struct.error, IndexError, ValueError) as exc:
            raise SnapshotFormatError(f"snapshot is damaged: {exc}") from exc


class _Cursor:
    def __init__(self, data: bytes, pos: int) -> None:
        self.data, self.pos = data, pos

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data) - 4:
            raise SnapshotFormatError("snapshot truncated")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str) -> tuple[int, ...]:
        st = struct.Struct(fmt)
        return st.unpack(self.take(st.size))


def _parse(data: bytes) -> Snapshot:
    if len(data) < _HEADER.size + 17 or data[:4] != MAGIC:
        raise SnapshotFormatError("not a fleettrust revocation snapshot")
    if zlib.crc32(data[:-4]) != struct.unpack(">I", data[-4:])[0]:
        raise SnapshotFormatError("snapshot checksum mismatch (truncated or damaged)")
    (_, version, algorithm, _flags, seq, cutoff, generated, universe, revoked,
     salt) = _HEADER.unpack_from(data, 0)
    if version != VERSION or algorithm != ALGORITHM_RIBBON2:
        raise SnapshotFormatError(f"unsupported snapshot version {version}/{algorithm}")
    cur = _Cursor(data, _HEADER.size)
    a_slots, f = cur.unpack(">IB")
    a = None
    if a_slots:
        if a_slots <= WIDTH or not 0 < f <= 16:
            raise SnapshotFormatError("bad level A")
        a = RibbonLevel(1, a_slots, tuple(cur.take((a_slots + 7) // 8) for _ in range(f)))
    (b_slots,) = cur.unpack(">I")
    b = None
    if b_slots:
        if b_slots <= WIDTH:
            raise SnapshotFormatError("bad level B")
        b = RibbonLevel(2, b_slots, (cur.take((b_slots + 7) // 8),))
    (n_exc,) = cur.unpack(">I")
    exceptions = {format(int.from_bytes(cur.take(cur.take(1)[0]), "big"), "x")
                  for _ in range(n_exc)}
    if cur.pos != len(data) - 4:
        raise SnapshotFormatError("trailing bytes in snapshot")
    return Snapshot(seq, dt.datetime.fromtimestamp(cutoff, dt.UTC),
                    dt.datetime.fromtimestamp(generated, dt.UTC), universe, revoked,
                    RibbonFilter(salt, a, b), frozenset(exceptions))


def salt_for(seq: int, universe: int) -> bytes:
    """Deterministic salt: two server processes build byte-identical snapshots of one state."""
    return hashlib.sha256(b"ftrc-salt|%d|%d" % (seq, universe)).digest()[:16]


def build_snapshot(seq: int, issued: Iterable[tuple[str, dt.datetime]], revoked: set[str],
                   *, now: dt.datetime, margin: dt.timedelta | None = None) -> Snapshot:
    """Snapshot of ``revoked`` (hex serials) over ``issued`` ((hex serial, notBefore) pairs);
    the universe ends ``margin`` (default :data:`UNIVERSE_MARGIN`) before ``now``."""
    cutoff = (now - (UNIVERSE_MARGIN if margin is None else margin)).replace(microsecond=0)
    include: list[bytes] = []
    exclude: list[bytes] = []
    exceptions: set[str] = set()
    seen: set[str] = set()
    for serial_hex, not_before in issued:
        seen.add(serial_hex)
        is_rev = serial_hex in revoked
        if not_before > cutoff:
            if is_rev:
                exceptions.add(serial_hex)
            continue
        (include if is_rev else exclude).append(serial_bytes(serial_hex))
    exceptions.update(s for s in revoked if s not in seen)
    universe = len(include) + len(exclude)
    filt = build_filter(include, exclude, salt_for(seq, universe))
    return Snapshot(seq, cutoff, now.replace(microsecond=0), universe, len(include), filt,
                    frozenset(exceptions))


def revoked_at(session: Session, seq: int) -> set[str]:
    """Serials revoked or on hold after replaying the log up to and including ``seq``."""
    state: dict[str, bool] = {}
    rows = session.execute(
        select(Revocation.serial_hex, Revocation.action).where(Revocation.seq <= seq)
        .order_by(Revocation.seq)
    )
    for serial, action in rows:
        state[serial] = action != "release"
    return {s for s, rev in state.items() if rev}


def snapshot_from_db(session: Session, *, now: dt.datetime,
                     seq: int | None = None) -> Snapshot:
    """Build the snapshot of the current database (universe: device certificates)."""
    from fleettrust.revocation.feed import head_seq

    covered = head_seq(session) if seq is None else seq
    revoked = revoked_at(session, covered)
    issued = session.execute(
        select(Certificate.serial_hex, Certificate.not_before).where(Certificate.kind == "device")
    ).all()
    return build_snapshot(covered, ((s, nb) for s, nb in issued), revoked, now=now)
