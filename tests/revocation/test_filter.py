"""The compact snapshot: exact over the universe, compact, versioned, damage-evident."""

from __future__ import annotations

import datetime as dt
import random
import struct

import pytest
from cryptography import x509

from fleettrust.revocation import filter as flt
from fleettrust.revocation.feed import head_seq
from fleettrust.services import revocation as rev
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import BatchCreated
from tests.revocation.feed_support import issue_many

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
OLD = NOW - dt.timedelta(days=30)


def _serials(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [format(rnd.getrandbits(127) | 1 << 126, "x") for _ in range(n)]


@pytest.mark.parametrize(("n", "r"), [(20_000, 200), (20_000, 2_000), (3_000, 2_900),
                                      (500, 1), (500, 0), (200, 200)])
def test_exact_for_every_issued_serial(n: int, r: int) -> None:
    serials = _serials(n, n + r)
    revoked = set(serials[:r])
    snap = flt.build_snapshot(9, [(s, OLD) for s in serials], revoked, now=NOW)
    again = flt.Snapshot.from_bytes(snap.to_bytes())
    wrong = [s for s in serials if again.is_revoked(s) != (s in revoked)]
    assert wrong == []
    assert (again.seq, again.universe, again.revoked) == (9, n, r)


def test_size_below_a_byte_per_revoked_at_ten_percent() -> None:
    serials = _serials(20_000, 1)
    revoked = set(serials[:2_000])
    data = flt.build_snapshot(1, [(s, OLD) for s in serials], revoked, now=NOW).to_bytes()
    assert len(data) / 2_000 < 0.8, len(data)  # entropy bound here: 0.59 B per revoked


def test_deterministic_and_versioned() -> None:
    serials = _serials(1_000, 2)
    issued = [(s, OLD) for s in serials]
    a = flt.build_snapshot(5, issued, set(serials[:50]), now=NOW).to_bytes()
    b = flt.build_snapshot(5, issued, set(serials[:50]), now=NOW).to_bytes()
    assert a == b  # two processes serve identical bytes for one state
    assert a[:4] == b"FTRC"
    assert a[4] == flt.VERSION
    assert struct.unpack(">Q", a[8:16])[0] == 5  # seq covered in the header
    for bad in (a[:-1], a[:20], b"XXXX" + a[4:], a[:30] + bytes([a[30] ^ 1]) + a[31:]):
        with pytest.raises(flt.SnapshotFormatError):
            flt.Snapshot.from_bytes(bad)
    future = a[:4] + bytes([2]) + a[5:-4]
    future += struct.pack(">I", __import__("zlib").crc32(future))
    with pytest.raises(flt.SnapshotFormatError, match="unsupported"):
        flt.Snapshot.from_bytes(future)


def test_certificates_newer_than_the_cutoff_and_cas_are_listed() -> None:
    serials = _serials(300, 3)
    fresh = NOW - dt.timedelta(minutes=5)  # issued after the cutoff (an hour before NOW)
    issued = [(s, OLD) for s in serials[:200]] + [(s, fresh) for s in serials[200:]]
    revoked = {serials[0], serials[250], "abcdef"}  # "abcdef": a revoked CA certificate
    snap = flt.Snapshot.from_bytes(flt.build_snapshot(3, issued, revoked, now=NOW).to_bytes())
    assert snap.exceptions == {serials[250], "abcdef"}
    assert snap.universe == 200
    assert snap.is_revoked(serials[0], OLD)
    assert snap.is_revoked(serials[250], fresh)
    for s in serials[201:250]:
        assert not snap.is_revoked(s, fresh)  # outside the universe: the filter is not asked


def test_snapshot_from_database_matches_revocation_state(
        ctx: ServiceContext, admin: Principal, batch: BatchCreated,
        factory_principal: Principal) -> None:
    devs = issue_many(ctx, factory_principal, batch.batch.id, 20)
    for d in devs[:5]:
        rev.revoke_device(ctx, admin, d.device_id)
    rev.suspend_device(ctx, admin, devs[5].device_id)
    rev.suspend_device(ctx, admin, devs[6].device_id)
    rev.release_device(ctx, admin, devs[6].device_id)
    with ctx.sessions() as s:
        snap = flt.snapshot_from_db(s, now=ctx.clock.now() + dt.timedelta(hours=2))
        assert snap.seq == head_seq(s)
    snap = flt.Snapshot.from_bytes(snap.to_bytes())
    assert snap.universe == 20
    assert snap.revoked == 6
    for i, d in enumerate(devs):
        nb = x509.load_pem_x509_certificate(d.certificate_pem.encode()).not_valid_before_utc
        assert snap.is_revoked(d.serial_hex, nb) == (i < 6), i
