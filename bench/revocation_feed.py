"""Benchmark: the device revocation feed (the "Revocation feed" part of the revocation bench).

Functions other benches can call (``bench/revocation.py``):

* :func:`filter_sizes` — bytes of the compact snapshot (exact two-level Ribbon filter) for a
  universe of issued device serials and a number of revoked ones, build time, the information-
  theoretic lower bound ``log2 C(n, r)`` bits, a CRLite-style Bloom cascade of the same sets and
  the DER size of a plain CRL (signed, P-256) for comparison.
* :func:`catchup_bytes` — bytes an offline agent downloads to catch up on ``k`` events: feed v1,
  v2 (raw and gzip) and the snapshot.
* :func:`latency` — a real deployment on this machine: the operator API (uvicorn, one process)
  with the feed router, the MQTT publisher in its own process, a real Mosquitto, and
  ``listeners`` SSE clients plus ``listeners`` MQTT subscribers in a separate asyncio process.
  A batch of ``batch_size`` devices is revoked with ``services.revocation.revoke_batch``; from
  the instant the call returns, each listener's delay until it holds the operation's last
  event is recorded (p50/p99/max). SSE runs over plain loopback HTTP (TLS would add
  per-connection handshake cost, not per-event latency); the broker listener is plain for the
  same reason.

    .venv/bin/python bench/revocation_feed.py                 # everything, default sizes
    .venv/bin/python bench/revocation_feed.py --only filter --issued 100000
    .venv/bin/python bench/revocation_feed.py --only latency --listeners 1000 --batch 1000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gzip
import hashlib
import json
import math
import multiprocessing as mp
import os
import random
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT_PASSPHRASE = b"bench root passphrase"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _serials(n: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [format(rnd.getrandbits(127) | 1 << 126, "x") for _ in range(n)]


def _log2_binom(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


# --- comparison: a CRLite-style Bloom filter cascade (what CRLite shipped first) --------------


def bloom_cascade_bytes(include: list[bytes], exclude: list[bytes]) -> tuple[int, int]:
    """(bytes, levels) of a Bloom cascade (level 1 fp r/(sqrt2 s), then 1/2), BLAKE2b."""
    salt = b"bench-bloom-salt"
    total = levels = 0
    inc, exc = include, exclude
    first = min(0.5, len(inc) / (math.sqrt(2) * max(1, len(exc))))
    depth = 1
    while inc:
        n = len(inc)
        p = first if depth == 1 else 0.5
        bits = max(8, math.ceil(-n * math.log(p) / math.log(2) ** 2))
        k = max(1, round(bits / n * math.log(2)))
        buf = bytearray((bits + 7) // 8)

        def idx(key: bytes, bits: int = bits, k: int = k, depth: int = depth) -> list[int]:
            d = hashlib.blake2b(key, digest_size=16, key=salt, person=bytes([depth])).digest()
            h1, h2 = int.from_bytes(d[:8], "big"), int.from_bytes(d[8:], "big") | 1
            return [(h1 + i * h2) % bits for i in range(k)]

        for key in inc:
            for i in idx(key):
                buf[i >> 3] |= 1 << (i & 7)
        fps = [key for key in exc if all(buf[i >> 3] >> (i & 7) & 1 for i in idx(key))]
        total += len(buf) + 5
        levels += 1
        inc, exc = fps, inc
        depth += 1
    return total, levels


def crl_der_bytes(serials: list[str]) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Bench Batch CA")])
    revoked = [x509.RevokedCertificateBuilder().serial_number(int(s, 16)).revocation_date(now)
               .add_extension(x509.CRLReason(x509.ReasonFlags.key_compromise), False).build()
               for s in serials]
    crl = x509.CertificateRevocationListBuilder(
        issuer_name=name, last_update=now, next_update=now + dt.timedelta(days=1),
        revoked_certificates=revoked).sign(key, hashes.SHA256())
    return len(crl.public_bytes(serialization.Encoding.DER))


def filter_sizes(issued: int = 100_000, revoked: tuple[int, ...] = (1_000, 10_000),
                 compare: bool = True) -> list[dict[str, Any]]:
    from fleettrust.revocation.filter import build_snapshot, serial_bytes

    now = dt.datetime.now(dt.UTC)
    old = now - dt.timedelta(days=10)
    serials = _serials(issued, 42)
    out = []
    for r in revoked:
        rev = set(serials[:r])
        t0 = time.perf_counter()
        snap = build_snapshot(1, [(s, old) for s in serials], rev, now=now)
        data = snap.to_bytes()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        sample = serials[: min(issued, 20_000)]
        wrong = sum(snap.is_revoked(s) != (s in rev) for s in sample)
        lookup_us = (time.perf_counter() - t0) / len(sample) * 1e6
        row: dict[str, Any] = {
            "issued": issued, "revoked": r, "bytes": len(data),
            "bytes_per_revoked": round(len(data) / r, 3),
            "bound_bytes_per_revoked": round(_log2_binom(issued, r) / 8 / r, 3),
            "build_s": round(build_s, 2), "lookup_us": round(lookup_us, 1),
            "wrong_answers": wrong,
        }
        if compare:
            inc = [serial_bytes(s) for s in serials[:r]]
            exc = [serial_bytes(s) for s in serials[r:]]
            b, levels = bloom_cascade_bytes(inc, exc)
            row["bloom_cascade_bytes_per_revoked"] = round(b / r, 3)
            row["bloom_cascade_levels"] = levels
            row["crl_bytes_per_revoked"] = round(crl_der_bytes(serials[:r]) / r, 1)
        out.append(row)
    return out


def catchup_bytes(events: tuple[int, ...] = (10, 1_000, 10_000),
                  issued: int = 100_000) -> list[dict[str, Any]]:
    """Bytes to download for an agent ``k`` events behind (the snapshot: ``k`` revoked out of
    ``issued``; pages of 1000 events with their JSON envelopes)."""
    from fleettrust.revocation import feed
    from fleettrust.revocation.filter import build_snapshot

    now = dt.datetime.now(dt.UTC)
    serials = _serials(issued, 7)
    cas = [f"ca_{hashlib.sha256(str(i).encode()).hexdigest()[:16]}" for i in range(4)]
    out = []
    for k in events:
        evs = [feed.FeedEvent(i + 1, serials[i], cas[i % 4], "revoke", "keyCompromise",
                              now - dt.timedelta(seconds=k - i)) for i in range(k)]
        sizes = {"v1": 0, "v2": 0, "v1_gzip": 0, "v2_gzip": 0}
        for start in range(0, k, feed.DEFAULT_LIMIT):
            chunk = tuple(evs[start:start + feed.DEFAULT_LIMIT])
            page = feed.FeedPage(start, chunk[-1].seq, k, chunk[-1].seq < k, False, chunk)
            for fmt in ("v1", "v2"):
                body = feed.dumps(feed.render(page, fmt))
                sizes[fmt] += len(body)
                sizes[f"{fmt}_gzip"] += len(gzip.compress(body))
        snap = build_snapshot(k, [(s, now - dt.timedelta(days=9)) for s in serials],
                              set(serials[:k]), now=now).to_bytes()
        out.append({"events": k, **sizes, "snapshot": len(snap),
                    "v1_per_event": round(sizes["v1"] / k, 1),
                    "v2_per_event": round(sizes["v2"] / k, 1)})
    return out


# --- latency: server process, listener process, Mosquitto ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(data_dir: str, db_url: str, port: int) -> None:
    """Server process: the operator API with the feed router (uvicorn, one worker)."""
    import uvicorn

    from fleettrust.api.app import create_app
    from fleettrust.api.feed_routes import operator_router
    from fleettrust.config import Settings
    from fleettrust.services.context import ServiceContext

    ctx = ServiceContext.create(Settings(data_dir=Path(data_dir), database_url=db_url))
    app = create_app(ctx)
    app.include_router(operator_router)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=4096)


def _publish(data_dir: str, db_url: str, mqtt_port: int) -> None:
    """Publisher process: the MQTT publisher (v1 and v2 topics) next to the broker."""
    from fleettrust.config import Settings
    from fleettrust.revocation.mqtt import BrokerSettings, start_publisher
    from fleettrust.services.context import ServiceContext

    ctx = ServiceContext.create(Settings(data_dir=Path(data_dir), database_url=db_url))
    start_publisher(ctx, BrokerSettings(port=mqtt_port), formats=("v1", "v2"))
    while True:
        time.sleep(3600)


_ID = re.compile(rb"id: (\d+)\n")
_NEXT = re.compile(rb'"next":(\d+)')


async def _sse_listener(port: int, arrivals: list[tuple[int, float]], ready: asyncio.Event,
                        writers: list[asyncio.StreamWriter], fmt: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writers.append(writer)
    writer.write(b"GET /v1/revocations/stream?format=%s HTTP/1.1\r\nHost: x\r\n"
                 b"Accept: text/event-stream\r\n\r\n" % fmt.encode())
    await writer.drain()
    tail = b""
    while True:
        try:
            data = await reader.read(1 << 20)
        except (ConnectionError, OSError):
            break
        if not data:
            break
        now = time.time()
        if not ready.is_set() and b"retry:" in data:
            ready.set()
        buf = tail + data
        arrivals.extend((int(m.group(1)), now) for m in _ID.finditer(buf))
        tail = buf[-32:]


def _mqtt_packet(kind: int, body: bytes) -> bytes:
    n, rem = len(body), bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        rem.append(b | (0x80 if n else 0))
        if not n:
            return bytes([kind]) + bytes(rem) + body


async def _mqtt_listener(port: int, i: int, arrivals: list[tuple[int, float]],
                         ready: asyncio.Event, writers: list[asyncio.StreamWriter],
                         fmt: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 22)
    writers.append(writer)
    cid = f"bench-{os.getpid()}-{i}".encode()
    connect = (b"\x00\x04MQTT\x04\x02\x00\x3c" + len(cid).to_bytes(2, "big") + cid)
    writer.write(_mqtt_packet(0x10, connect))
    topic = b"fleettrust/revocations/" + fmt.encode()
    writer.write(_mqtt_packet(0x82, b"\x00\x01" + len(topic).to_bytes(2, "big") + topic + b"\x00"))
    await writer.drain()
    with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError, OSError):
        while True:
            head = await reader.readexactly(1)
            n = shift = 0
            while True:
                b = (await reader.readexactly(1))[0]
                n |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            body = await reader.readexactly(n)
            now = time.time()
            if head[0] >> 4 == 9:  # SUBACK
                ready.set()
            elif head[0] >> 4 == 3:  # PUBLISH (QoS 0 delivery)
                m = _NEXT.search(body[:200])
                if m:
                    arrivals.append((int(m.group(1)), now))


def _listen(port: int, mqtt_port: int, n: int, conn: Any, fmt: str) -> None:
    """Listener process: n SSE clients + n MQTT subscribers; reports arrival times."""

    async def main() -> None:
        writers: list[asyncio.StreamWriter] = []
        sse = [list[tuple[int, float]]() for _ in range(n)]
        mq = [list[tuple[int, float]]() for _ in range(n)]
        ready = [asyncio.Event() for _ in range(2 * n)]
        tasks = []
        for i in range(n):
            tasks.append(asyncio.create_task(
                _sse_listener(port, sse[i], ready[i], writers, fmt)))
            tasks.append(asyncio.create_task(
                _mqtt_listener(mqtt_port, i, mq[i], ready[n + i], writers, fmt)))
            if i % 100 == 99:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 60)
        conn.send("ready")
        loop = asyncio.get_running_loop()
        target = await loop.run_in_executor(None, conn.recv)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if all(any(s >= target for s, _ in a) for a in sse + mq):
                break
            await asyncio.sleep(0.05)
        for w in writers:
            w.transport.abort()
        await asyncio.gather(*tasks, return_exceptions=True)
        conn.send({"sse": sse, "mqtt": mq})

    asyncio.run(main())


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def _setup_fleet(tmp: Path, db_url: str, batch_size: int) -> tuple[Any, Any, str]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleettrust import ceremony
    from fleettrust.config import Settings
    from fleettrust.services import hierarchy, issuance
    from fleettrust.services.auth import Principal, create_token
    from fleettrust.services.context import ServiceContext
    from fleettrust.storage.db import make_engine
    from fleettrust.storage.migrate import upgrade

    settings = Settings(data_dir=tmp / "data", database_url=db_url, max_bulk_items=10_000)
    settings.data_dir.mkdir()
    engine = make_engine(db_url)
    upgrade(engine)
    engine.dispose()
    ctx = ServiceContext.create(settings)

    def principal(role: str, subject: str, factory_id: str | None = None) -> Principal:
        with ctx.transaction() as s:
            row, _ = create_token(s, role=role, subject=subject, now=ctx.clock.now(),
                                  factory_id=factory_id)
            return Principal(row.id, role, subject, factory_id, "127.0.0.1")

    admin = principal("admin", "bench")
    now = dt.datetime.now(dt.UTC)
    info = ceremony.init_root(tmp / "root", passphrase=ROOT_PASSPHRASE, now=now)
    csr = hierarchy.create_fleet_csr(ctx, admin, "Fleet CA")
    fleet = ceremony.sign_ca_csr(tmp / "root", csr.encode(), passphrase=ROOT_PASSPHRASE, now=now)
    hierarchy.import_fleet_certificate(
        ctx, admin, fleet.public_bytes(serialization.Encoding.PEM).decode(),
        info.certificate.public_bytes(serialization.Encoding.PEM).decode())
    fac = hierarchy.create_factory(ctx, admin, name="Bench Factory")
    station = principal("factory", "bench-station", fac.factory.id)
    batch = hierarchy.create_batch(ctx, station, fac.factory.id, name="bench",
                                   product_model="B-1", hardware_revision="r1",
                                   planned_size=batch_size, manufactured_on=dt.date.today()).batch
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "device")])
    for start in range(0, batch_size, 5000):
        reqs = []
        for i in range(start, min(batch_size, start + 5000)):
            key = ec.generate_private_key(ec.SECP256R1())
            pem = (x509.CertificateSigningRequestBuilder().subject_name(name)
                   .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
            reqs.append(issuance.IssueRequest(csr=pem, manifest={
                "cpu_serial": f"CPU{i:010d}", "wlan_module_id": f"WL-{i}",
                "mac_addresses": [f"02:00:00:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:"
                                  f"{i & 255:02x}"]}))
        issuance.issue_devices(ctx, station, batch.id, reqs)
    return ctx, admin, batch.id


def latency(listeners: int = 1000, batch_size: int = 1000,
            pg_url: str | None = None, fmt: str = "v1") -> dict[str, Any]:
    """Revoke a batch of ``batch_size`` devices with ``listeners`` SSE clients and as many
    MQTT subscribers connected; delays from the call's return to each listener having it."""
    import httpx

    from fleettrust.services import revocation as rev

    os.environ.setdefault("FLEETTRUST_KEYSTORE_PASSPHRASE", "bench key-store passphrase")
    with tempfile.TemporaryDirectory(prefix="ft-feed-bench-") as tmp_s:
        tmp = Path(tmp_s)
        db_url = pg_url or f"sqlite:///{tmp / 'bench.db'}"
        ctx, admin, batch_id = _setup_fleet(tmp, db_url, batch_size)
        mqtt_port, http_port = _free_port(), _free_port()
        conf = tmp / "mosquitto.conf"
        conf.write_text(f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nmax_queued_messages 10000\n")
        broker = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        server = mp.get_context("spawn").Process(
            target=_serve, args=(str(tmp / "data"), db_url, http_port), daemon=True)
        server.start()
        pub = mp.get_context("spawn").Process(
            target=_publish, args=(str(tmp / "data"), db_url, mqtt_port), daemon=True)
        pub.start()
        lp: Any = None
        try:
            deadline = time.time() + 30
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{http_port}/healthz").status_code == 200:
                        break
                if time.time() > deadline:
                    raise RuntimeError("server did not start")
                time.sleep(0.1)
            time.sleep(1.0)  # the publisher connects and publishes its head
            parent, child = mp.get_context("spawn").Pipe()
            lp = mp.get_context("spawn").Process(
                target=_listen, args=(http_port, mqtt_port, listeners, child, fmt), daemon=True)
            lp.start()
            if parent.recv() != "ready":
                raise RuntimeError("listeners not ready")
            time.sleep(0.5)
            t_call = time.time()
            result = rev.revoke_batch(ctx, admin, batch_id, "keyCompromise")
            t_ret = time.time()
            last_seq = result.last_seq
            while last_seq is None:  # a large operation writes its rows after returning
                time.sleep(0.01)
                last_seq = rev.operation_status(ctx, admin, result.operation_id)["last_seq"]
            parent.send(last_seq)
            got = parent.recv()
            out: dict[str, Any] = {"listeners": listeners, "batch": batch_size, "format": fmt,
                                   "events": result.newly_revoked,
                                   "api_call_ms": round((t_ret - t_call) * 1000, 1)}
            for kind in ("sse", "mqtt"):
                delays = []
                missing = 0
                for arr in got[kind]:
                    ts = [t for s, t in arr if s >= last_seq]
                    if ts:
                        delays.append(max(0.0, min(ts) - t_ret) * 1000)
                    else:
                        missing += 1
                out[kind] = ({"min_ms": round(min(delays), 1),
                              "p50_ms": round(_pct(delays, 0.5), 1),
                              "p99_ms": round(_pct(delays, 0.99), 1),
                              "max_ms": round(max(delays), 1),
                              "mean_ms": round(statistics.fmean(delays), 1)}
                             if delays else {}) | {"missing": missing}
            with httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=60) as c:
                sizes = {}
                for fmt in ("v1", "v2"):
                    since, total = 0, 0
                    while True:
                        r = c.get("/v1/revocations", params={"since": since, "format": fmt})
                        total += len(r.content)
                        doc = r.json()
                        since = doc["next"]
                        if not doc["more"]:
                            break
                    sizes[fmt] = total
                sizes["snapshot"] = len(c.get("/v1/revocations/snapshot").content)
            out["offline_catchup_bytes"] = sizes
            return out
        finally:
            if lp is not None:
                lp.join(5)
                if lp.is_alive():
                    lp.terminate()
            server.terminate()
            server.join(10)
            pub.terminate()
            pub.join(10)
            broker.terminate()
            broker.wait(10)
            ctx.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", choices=["filter", "catchup", "latency"], action="append")
    ap.add_argument("--issued", type=int, default=100_000)
    ap.add_argument("--revoked", type=int, nargs="+", default=[1_000, 10_000])
    ap.add_argument("--listeners", type=int, default=1000)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--pg-url", default=None, help="PostgreSQL URL (default: SQLite)")
    ap.add_argument("--format", dest="fmt", nargs="+", default=["v1"], choices=["v1", "v2"])
    args = ap.parse_args()
    only = set(args.only or ["filter", "catchup", "latency"])
    results: dict[str, Any] = {}
    if "filter" in only:
        results["filter"] = filter_sizes(args.issued, tuple(args.revoked))
    if "catchup" in only:
        results["catchup"] = catchup_bytes(issued=args.issued)
    if "latency" in only:
        results["latency"] = [latency(args.listeners, b, args.pg_url, f)
                              for f in args.fmt for b in args.batch]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
