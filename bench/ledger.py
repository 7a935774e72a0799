"""Benchmark: the transparency log — sequencer appends per second, and proof generation at one
million leaves.

What is timed (per backend, SQLite file and/or PostgreSQL schema ``bench_ledger``):

1. **Sequencer appends** on an empty log: ``--events`` audit events are inserted first (untimed,
   bulk); half of them are ``device.manufactured``-shaped events naming a real stored
   certificate (a 450-byte P-256 device certificate, so the leaf embeds its DER and SHA-256 as
   in production), the rest small operator events. Then ``services.ledger.sequence_once`` runs
   until the log has caught up (batches of ``--batch``; each batch: read events, look up
   certificates, build canonical-JSON leaves, hash, write leaves + subtree hashes + the
   certificate index, sign an STH, commit). Rate = events / wall time.
2. **A 1,000,000-leaf log** built directly through the storage path
   (``LedgerStore.append`` with 600-byte leaves, 50,000 per transaction): leaves/s.
3. **Proof generation at that size**, through the same functions the API calls
   (``ledger.inclusion_proof`` / ``ledger.consistency_proof``: a fresh session, the node
   lookup, the hashing): ``--samples`` random leaves / random first sizes; p50, p99, max.
   Every proof is verified against the stored root (RFC 9162 algorithms) outside the timing.
4. **Sequencer appends again**, on top of the 1M-leaf log (same event mix).

    .venv/bin/python bench/ledger.py --db both --leaves 1000000
    .venv/bin/python bench/ledger.py --db sqlite --leaves 100000 --events 5000   # quick
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_PG_URL = os.environ.get("FLEETTRUST_BENCH_PG_URL",
                                "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_SCHEMA = "bench_ledger"


def _context(db: str, base: Path) -> Any:
    from sqlalchemy import create_engine, text

    from fleettrust.config import Settings
    from fleettrust.services.context import ServiceContext
    from fleettrust.storage.db import make_engine
    from fleettrust.storage.migrate import upgrade

    os.environ.setdefault("FLEETTRUST_KEYSTORE_PASSPHRASE", "bench-ledger-keystore")
    data = base / db
    data.mkdir(parents=True, exist_ok=True)
    if db == "sqlite":
        url = f"sqlite:///{data / 'ledger.db'}"
    else:
        admin = create_engine(DEFAULT_PG_URL)
        with admin.begin() as c:
            c.execute(text(f'DROP SCHEMA IF EXISTS "{PG_SCHEMA}" CASCADE'))
            c.execute(text(f'CREATE SCHEMA "{PG_SCHEMA}"'))
        admin.dispose()
        sep = "&" if "?" in DEFAULT_PG_URL else "?"
        url = f"{DEFAULT_PG_URL}{sep}options=-csearch_path%3D{PG_SCHEMA}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return ServiceContext.create(Settings(data_dir=data, database_url=url))


def _device_der() -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "d-bench")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.DER)


def insert_events(ctx: Any, n: int, tag: str) -> None:
    """``n`` audit events (half of them naming a stored device certificate), untimed."""
    from sqlalchemy import insert

    from fleettrust.storage.models import AuditEvent, Certificate

    der = _device_der()
    now = dt.datetime.now(dt.UTC)
    rnd = random.Random(tag)
    for start in range(0, n, 5000):
        certs, events = [], []
        for i in range(start, min(n, start + 5000)):
            if i % 2 == 0:
                serial = format(rnd.getrandbits(127) | 1 << 126, "x")
                device = f"d-{tag}-{i:08d}"
                certs.append({"serial_hex": serial, "ca_id": "ca_bench", "kind": "device",
                              "device_id": device, "subject_ca_id": None, "der": der,
                              "public_key_sha256": f"{i:064x}", "not_before": now,
                              "not_after": now + dt.timedelta(days=3650), "status": "good",
                              "revoked_at": None, "revocation_reason": None, "created_at": now})
                events.append({"occurred_at": now, "actor": "factory:station-1",
                               "actor_role": "factory", "action": "device.manufactured",
                               "target_type": "device", "target_id": device,
                               "remote_addr": "10.0.0.7",
                               "details": {"batch_id": "bat_bench", "factory_id": "fac_bench",
                                           "ca_id": "ca_bench", "key_origin": "device",
                                           "serial": serial, "station": "line-1",
                                           "manifest_sha256": f"{i:064x}",
                                           "not_after": "2036-01-01T00:00:00+00:00",
                                           "findings": []}})
            else:
                events.append({"occurred_at": now, "actor": "admin:alice", "actor_role": "admin",
                               "action": "token.create", "target_type": "token",
                               "target_id": f"tok_{tag}{i:012d}", "remote_addr": "127.0.0.1",
                               "details": {"role": "auditor", "subject": f"user-{i}"}})
        with ctx.transaction() as s:
            if certs:
                s.execute(insert(Certificate), certs)
            s.execute(insert(AuditEvent), events)


def bench_sequencer(ctx: Any, events: int, batch: int, tag: str) -> dict[str, float]:
    from fleettrust.services import ledger

    insert_events(ctx, events, tag)
    before = ledger.leaf_count(ctx)
    t0 = time.perf_counter()
    heads = 0
    while True:
        res = ledger.sequence_once(ctx, max_batch=batch)
        heads += res.sth is not None
        if not res.more and res.waiting_on_gap is None:
            break
    wall = time.perf_counter() - t0
    appended = ledger.leaf_count(ctx) - before
    assert appended >= events, (appended, events)
    return {"events": appended, "seconds": wall, "per_s": appended / wall, "sths": heads}


def build_leaves(ctx: Any, target: int, chunk: int = 50_000,
                 leaf_bytes: int = 600) -> dict[str, float]:
    from fleettrust.services.ledger import LedgerStore, NewLeaf

    with ctx.sessions() as s:
        size = LedgerStore(s).size()
    filler = b"x" * max(0, leaf_bytes - 40)
    t0 = time.perf_counter()
    added = 0
    while size < target:
        n = min(chunk, target - size)
        leaves = [NewLeaf(b'{"bench":%d,"pad":"%s"}' % (size + j, filler), kind="bench")
                  for j in range(n)]
        with ctx.transaction() as s:
            size, _ = LedgerStore(s).append(leaves, dt.datetime.now(dt.UTC), size)
        added += n
        print(f"  built {size:,} leaves ({added / (time.perf_counter() - t0):,.0f}/s)",
              file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    return {"leaves": added, "seconds": wall, "per_s": added / wall if wall else 0.0,
            "size": size}


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def bench_proofs(ctx: Any, samples: int) -> dict[str, Any]:
    from fleettrust.ledger import merkle
    from fleettrust.services import ledger
    from fleettrust.services.ledger import LedgerStore

    with ctx.sessions() as s:
        store = LedgerStore(s)
        size = store.size()
        roots = {size: store.root(size)}
    rnd = random.Random(1)
    inc: list[float] = []
    cons: list[float] = []
    proofs = []
    for _ in range(samples):
        i = rnd.randrange(size)
        t = time.perf_counter()
        p = ledger.inclusion_proof(ctx, leaf_index=i, tree_size=size)
        inc.append(time.perf_counter() - t)
        proofs.append(p)
    cproofs = []
    for _ in range(samples):
        m = rnd.randrange(1, size)
        t = time.perf_counter()
        c = ledger.consistency_proof(ctx, m, size)
        cons.append(time.perf_counter() - t)
        cproofs.append(c)
    # verification, untimed
    with ctx.sessions() as s:
        store = LedgerStore(s)
        for p in proofs[:200]:
            assert p.leaf_hash is not None
            merkle.verify_inclusion(p.leaf_index, size, p.leaf_hash, p.audit_path, roots[size])
        for c in cproofs[:200]:
            merkle.verify_consistency(c.first, size, store.root(c.first), roots[size], c.path)
    ms = 1000.0
    return {
        "size": size,
        "inclusion_ms": (statistics.median(inc) * ms, _pct(inc, 0.99) * ms, max(inc) * ms),
        "consistency_ms": (statistics.median(cons) * ms, _pct(cons, 0.99) * ms, max(cons) * ms),
        "path_len": statistics.mean(len(p.audit_path) for p in proofs),
        "cons_len": statistics.mean(len(c.path) for c in cproofs),
    }


def run(db: str, args: argparse.Namespace, base: Path) -> None:
    ctx = _context(db, base)
    try:
        print(f"== {db}", flush=True)
        a = bench_sequencer(ctx, args.events, args.batch, "a")
        print(f"sequencer, empty log: {a['events']:,} events in {a['seconds']:.2f} s = "
              f"{a['per_s']:,.0f} appends/s ({a['sths']} STHs)", flush=True)
        b = build_leaves(ctx, args.leaves)
        print(f"storage path: {b['leaves']:,} leaves in {b['seconds']:.1f} s = "
              f"{b['per_s']:,.0f} leaves/s (log size {b['size']:,})", flush=True)
        p = bench_proofs(ctx, args.samples)
        print(f"proofs at {p['size']:,} leaves ({args.samples} each): inclusion p50/p99/max "
              f"{p['inclusion_ms'][0]:.2f}/{p['inclusion_ms'][1]:.2f}/{p['inclusion_ms'][2]:.2f}"
              f" ms (path {p['path_len']:.1f} hashes); consistency p50/p99/max "
              f"{p['consistency_ms'][0]:.2f}/{p['consistency_ms'][1]:.2f}/"
              f"{p['consistency_ms'][2]:.2f} ms ({p['cons_len']:.1f} hashes)", flush=True)
        c = bench_sequencer(ctx, args.events, args.batch, "c")
        print(f"sequencer, on the {p['size']:,}-leaf log: {c['events']:,} events in "
              f"{c['seconds']:.2f} s = {c['per_s']:,.0f} appends/s ({c['sths']} STHs)",
              flush=True)
    finally:
        ctx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--leaves", type=int, default=1_000_000)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--base", type=Path, default=None, help="work directory (default: temp)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleettrust-bench-ledger-") as tmp:
        base = args.base or Path(tmp)
        for db in (["sqlite", "postgresql"] if args.db == "both" else [args.db]):
            run(db, args, base)


if __name__ == "__main__":
    main()
