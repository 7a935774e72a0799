"""Benchmark: revoke a batch of N devices and time how fast each part of the system reflects it.

Set-up (not timed): a database (SQLite file or a fresh PostgreSQL schema) with the real
hierarchy (offline root ceremony, fleet CA, a factory with batch CAs) and one batch of
``--devices`` devices with its own batch CA. A few devices of the batch are issued for real
(``services.issuance``) so they can talk to the gateway over mutual TLS; the rest are inserted
as rows (device + certificate with a random 159-bit serial) straight into the tables, because
issuing 100,000 certificates takes minutes and nothing in revocation reads a certificate's DER.
On PostgreSQL the tables are then ``VACUUM ANALYZE``d (the state autovacuum leaves a table in
after a bulk insert; without it the first count scans the heap).

Running: the operator API (uvicorn, this process: context A) with the revocation and CRL routes
and the background CRL publisher, and the device gateway in **another OS process** (context B),
as in production. One probe device keeps an event stream open on the gateway.

Timed, from the moment the API call returns (``t = 0``):

* ``api_ms``: ``POST /v1/revocation/batches/{id}`` — the HTTP call itself;
* ``gateway_refuses_ms``: until a check-in of a probe device of the batch gets
  ``403 certificate_revoked`` from the gateway process; ``stream_closed_ms``: until the probe's
  open event stream is closed;
* ``crl_ms``: until the CA-level CRL served over HTTP lists a probe serial; ``crl_shard_ms``:
  the same for the probe's shard CRL (its CRL DP); CRL size and bytes per entry;
* ``rows_written_ms``: until every per-certificate row (feed events, certificate and device
  status) is written (operation state ``done``).

Sections: the revocation core's measurements are one :class:`Section`; other work items add
theirs (agents' p50/p99, OCSP, compact filter size) by appending to :data:`SECTIONS`. Each
section may ``prepare`` (before the revocation, e.g. start 1,000 agents) and ``measure`` (called
in its own thread right after the API call returns, given the :class:`Run`); its figures are
merged into the report.

    .venv/bin/python bench/revocation.py --db both --devices 100000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleettrust import ceremony
from fleettrust.config import Settings
from fleettrust.services import hierarchy, issuance
from fleettrust.services.auth import Principal, create_token
from fleettrust.services.context import ServiceContext
from fleettrust.storage.db import make_engine
from fleettrust.storage.migrate import upgrade

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ROOT_PASSPHRASE = b"bench root passphrase"
PROBES = 3


@dataclass
class Probe:
    device_id: str
    serial: int
    cert_path: Path
    key_path: Path
    key: Any
    manifest: dict[str, Any]


@dataclass
class Run:
    """Everything a section may use."""

    backend: str
    ctx: ServiceContext
    admin: Principal
    token: str
    api_url: str
    gateway_url: str
    root_path: Path
    factory_id: str
    batch_id: str
    batch_ca_id: str
    devices: int
    probes: list[Probe]
    workdir: Path
    t0: float = 0.0  # monotonic time the API call returned
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Section:
    name: str
    measure: Callable[[Run], dict[str, Any]]
    prepare: Callable[[Run], None] | None = None
    finish: Callable[[Run], None] | None = None


# --- set-up -------------------------------------------------------------------------------------


def _settings(backend: str, workdir: Path, pg_url: str) -> tuple[Settings, Callable[[], None]]:
    data = workdir / "data"
    data.mkdir(parents=True)
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if backend == "sqlite":
        url = f"sqlite:///{workdir / 'fleettrust.db'}"
    else:
        schema = "bench_rev_" + secrets.token_hex(4)
        admin = create_engine(pg_url)
        with admin.begin() as c:
            c.execute(text(f'CREATE SCHEMA "{schema}"'))
        sep = "&" if "?" in pg_url else "?"
        url = f"{pg_url}{sep}options=-csearch_path%3D{schema}"

        def cleanup() -> None:
            with admin.begin() as c:
                c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()

    return Settings(data_dir=data, database_url=url,
                    public_base_url="http://127.0.0.1:1"), cleanup


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build(backend: str, devices: int, workdir: Path, pg_url: str
          ) -> tuple[Run, Callable[[], None]]:
    os.environ.setdefault("FLEETTRUST_KEYSTORE_PASSPHRASE", "bench keystore passphrase")
    settings, cleanup = _settings(backend, workdir, pg_url)
    api_port = _free_port()
    settings = Settings(data_dir=settings.data_dir, database_url=settings.database_url,
                        public_base_url=f"http://127.0.0.1:{api_port}")
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    ctx = ServiceContext.create(settings)
    now = dt.datetime.now(dt.UTC)
    with ctx.transaction() as s:
        row, token = create_token(s, role="admin", subject="bench", now=now)
        admin = Principal(row.id, "admin", "bench")
    info = ceremony.init_root(workdir / "root", passphrase=ROOT_PASSPHRASE, now=now)
    csr = hierarchy.create_fleet_csr(ctx, admin, "Fleet CA")
    cert = ceremony.sign_ca_csr(workdir / "root", csr.encode(), passphrase=ROOT_PASSPHRASE,
                                now=now)
    from cryptography.hazmat.primitives import serialization

    hierarchy.import_fleet_certificate(
        ctx, admin, cert.public_bytes(serialization.Encoding.PEM).decode(),
        info.certificate.public_bytes(serialization.Encoding.PEM).decode())
    fac = hierarchy.create_factory(ctx, admin, name="Bench Factory", batch_cas=True)
    bat = hierarchy.create_batch(ctx, admin, fac.factory.id, name="bench-batch",
                                 product_model="M", hardware_revision="r1",
                                 planned_size=devices + PROBES,
                                 manufactured_on=dt.date(2026, 11, 1), own_ca=True)
    probes = _issue_probes(ctx, admin, bat.batch.id, workdir)
    t = time.perf_counter()
    _insert_rows(ctx, bat.batch.id, fac.factory.id, bat.batch.ca_id, devices - PROBES)
    print(f"  [{backend}] inserted {devices - PROBES} device rows in "
          f"{time.perf_counter() - t:.1f} s", file=sys.stderr)
    if backend == "postgresql":
        with ctx.engine.connect() as c:
            c = c.execution_options(isolation_level="AUTOCOMMIT")
            c.execute(text("VACUUM ANALYZE certificates"))
            c.execute(text("VACUUM ANALYZE devices"))
    root_path = workdir / "root.pem"
    root_path.write_bytes(info.certificate.public_bytes(serialization.Encoding.PEM))
    run = Run(backend, ctx, admin, token, f"http://127.0.0.1:{api_port}", "", root_path,
              fac.factory.id, bat.batch.id, bat.batch.ca_id, devices, probes, workdir)
    return run, cleanup


def _issue_probes(ctx: ServiceContext, admin: Principal, batch_id: str,
                  workdir: Path) -> list[Probe]:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    reqs, keys, manifests = [], [], []
    for i in range(PROBES):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "d")]))
               .sign(key, hashes.SHA256()))
        m = {"cpu_serial": f"PROBE{i:06d}", "mac_addresses": [f"02:00:00:00:00:{i:02x}"]}
        reqs.append(issuance.IssueRequest(
            csr=csr.public_bytes(serialization.Encoding.PEM).decode(), manifest=m))
        keys.append(key)
        manifests.append(m)
    res = issuance.issue_devices(ctx, admin, batch_id, reqs)
    probes = []
    for d, key, m in zip(res.devices, keys, manifests, strict=True):
        cp = workdir / f"{d.device_id}.pem"
        cp.write_text(d.certificate_pem + "".join(res.chain_pem))
        kp = workdir / f"{d.device_id}.key"
        kp.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
        probes.append(Probe(d.device_id, int(d.serial_hex, 16), cp, kp, key, m))
    return probes


def _insert_rows(ctx: ServiceContext, batch_id: str, factory_id: str, ca_id: str,
                 n: int) -> None:
    """Device and certificate rows for ``n`` devices, in bulk (COPY / executemany)."""
    from fleettrust.services.issuance import _BulkWriter
    from fleettrust.storage.models import Certificate, Device

    now = dt.datetime.now(dt.UTC)
    der = secrets.token_bytes(520)  # never read by revocation; realistic row width
    chunk = 20_000
    for start in range(0, n, chunk):
        with ctx.transaction() as s:
            w = _BulkWriter(s)
            ts = w.ts(now)
            later = w.ts(now + dt.timedelta(days=3650))
            devs, certs = [], []
            for i in range(start, min(n, start + chunk)):
                did = f"d-bench{i:09d}"
                devs.append((did, batch_id, factory_id, "active", "certificate", "device",
                             False, f'{{"cpu_serial":"B{i:09d}"}}', "0" * 64, None, None, ts,
                             None))
                certs.append((format(secrets.randbits(159) | (1 << 158), "x"), ca_id,
                              "device", did, None, der, secrets.token_hex(32), ts, later,
                              "good", None, None, ts))
            w.insert(Device, ("id", "batch_id", "factory_id", "status", "auth_method",
                              "key_origin", "weak_identity", "manifest", "manifest_sha256",
                              "station", "owner", "created_at", "last_seen_at"), devs)
            w.insert(Certificate, ("serial_hex", "ca_id", "kind", "device_id", "subject_ca_id",
                                   "der", "public_key_sha256", "not_before", "not_after",
                                   "status", "revoked_at", "revocation_reason", "created_at"),
                     certs)


# --- processes ----------------------------------------------------------------------------------

_GATEWAY = """
import asyncio, json, sys
from pathlib import Path
from fleettrust.config import Settings
from fleettrust.services.context import ServiceContext
from fleettrust.api.gateway_server import build_gateway
cfg = json.loads(sys.argv[1])
ctx = ServiceContext.create(Settings(data_dir=Path(cfg["data_dir"]),
                                     database_url=cfg["database_url"],
                                     public_base_url=cfg["base_url"]))
gw = build_gateway(ctx, port=0)
async def main():
    task = asyncio.create_task(gw.server.serve())
    while not gw.server.started:
        await asyncio.sleep(0.02)
    print(gw.server.bound_ports()[0], flush=True)
    await task
asyncio.run(main())
"""


def start_gateway(run: Run) -> subprocess.Popen[str]:
    s = run.ctx.settings
    cfg = json.dumps({"data_dir": str(s.data_dir), "database_url": s.database_url,
                      "base_url": s.public_base_url})
    proc = subprocess.Popen([sys.executable, "-c", _GATEWAY, cfg], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ))
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        raise RuntimeError("the gateway process did not start")
    run.gateway_url = f"https://127.0.0.1:{int(line)}"
    return proc


class ApiServer:
    """The operator API with the revocation and CRL routes and the background publisher."""

    def __init__(self, run: Run) -> None:
        import contextlib

        import uvicorn
        from fastapi import FastAPI

        from fleettrust.api.app import create_app
        from fleettrust.api.crl_routes import admin_router, public_router, start_publisher
        from fleettrust.api.revocation_routes import router

        app: FastAPI = create_app(run.ctx)
        app.include_router(public_router)
        app.include_router(admin_router)
        app.include_router(router)

        @contextlib.asynccontextmanager
        async def lifespan(a: FastAPI) -> Any:
            tasks = await start_publisher(a, run.ctx)
            yield
            for t in tasks:
                t.cancel()

        app.router.lifespan_context = lifespan
        port = int(run.api_url.rsplit(":", 1)[1])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


def _tls(run: Run, probe: Probe) -> Any:
    import ssl

    context = ssl.create_default_context(cafile=str(run.root_path))
    context.load_cert_chain(str(probe.cert_path), str(probe.key_path))
    return context


def _checkin_body(probe: Probe) -> dict[str, Any]:
    """A valid, signed check-in (docs/device-protocol.md)."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleettrust import pki
    from fleettrust.services.gateway import MANIFEST_CONTEXT

    signed = MANIFEST_CONTEXT + pki.canonical_json(pki.normalize_manifest(probe.manifest))
    sig = probe.key.sign(signed, ec.ECDSA(hashes.SHA256()))
    return {"firmware_version": "1.0.0", "boot_counter": 1, "uptime_s": 1,
            "manifest": probe.manifest, "manifest_signature": base64.b64encode(sig).decode()}


# --- the revocation core's section --------------------------------------------------------------


_PROBER = """
import json, ssl, sys, time
import httpx
cfg = json.loads(sys.argv[1])
context = ssl.create_default_context(cafile=cfg["root"])
context.load_cert_chain(cfg["cert"], cfg["key"])
deadline = time.time() + 120
with httpx.Client(base_url=cfg["url"], verify=context, timeout=10) as c:
    print("READY", flush=True)
    while time.time() < deadline:
        try:
            r = c.post("/v1/device/checkin", json=cfg["body"])
        except httpx.TransportError:
            continue
        if r.status_code == 403 and r.json().get("code") == "certificate_revoked":
            print("REFUSED", time.time(), flush=True)
            break
        time.sleep(0.002)
    else:
        print("TIMEOUT", flush=True)
"""


def _start_prober(run: Run, probe: Probe) -> subprocess.Popen[str]:
    cfg = json.dumps({"root": str(run.root_path), "cert": str(probe.cert_path),
                      "key": str(probe.key_path), "url": run.gateway_url,
                      "body": _checkin_body(probe)})
    proc = subprocess.Popen([sys.executable, "-c", _PROBER, cfg], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        raise RuntimeError("prober did not start")
    return proc


def _core_prepare(run: Run) -> None:
    # The first CRLs exist before the revocation (as in a running fleet).
    with httpx.Client(base_url=run.api_url, timeout=60) as c:
        for path in (f"/crl/{run.batch_ca_id}.crl",
                     f"/crl/{run.batch_ca_id}/{run.probes[0].serial % 16}.crl"):
            c.get(path).raise_for_status()
    # The probe's event stream (closed by the gateway on revocation).
    run.figures["_stream_closed"] = threading.Event()
    run.figures["_stream_open"] = threading.Event()

    def stream() -> None:
        try:
            with httpx.Client(base_url=run.gateway_url, verify=_tls(run, run.probes[1]),
                              timeout=120) as c, c.stream("GET", "/v1/device/events") as r:
                for line in r.iter_lines():
                    if "hello" in line:
                        run.figures["_stream_open"].set()
        except httpx.HTTPError:
            pass
        finally:
            run.figures["_closed_at"] = time.monotonic()
            run.figures["_stream_closed"].set()

    threading.Thread(target=stream, daemon=True).start()
    if not run.figures["_stream_open"].wait(15):
        raise RuntimeError("probe event stream did not open")
    run.figures["_prober"] = _start_prober(run, run.probes[0])


def _core_measure(run: Run) -> dict[str, Any]:
    out: dict[str, Any] = {}
    probe = run.probes[0]
    # Gateway: a kept-alive connection, one request every 2 ms until refused.
    # Gateway: measured by a prober in its own process (started before the API call), so
    # that this busy process's GIL does not delay the measurement.
    prober = run.figures["_prober"]
    line = prober.stdout.readline().strip() if prober.stdout is not None else ""
    prober.wait(60)
    if prober.stdout is not None:
        prober.stdout.close()
    refused_at = float(line.split()[1]) if line.startswith("REFUSED") else None
    out["gateway_refuses_ms"] = (round((refused_at - run.figures["_t0_wall"]) * 1000, 1)
                                 if refused_at is not None else None)
    run.figures["_stream_closed"].wait(30)
    out["stream_closed_ms"] = round((run.figures["_closed_at"] - run.t0) * 1000, 1)
    # CRLs served over HTTP.
    with httpx.Client(base_url=run.api_url, timeout=60) as c:
        for key, path in (("crl_ms", f"/crl/{run.batch_ca_id}.crl"),
                          ("crl_shard_ms", f"/crl/{run.batch_ca_id}/{probe.serial % 16}.crl")):
            while True:
                r = c.get(path)
                crl = x509.load_der_x509_crl(r.content)
                if crl.get_revoked_certificate_by_serial_number(probe.serial) is not None:
                    out[key] = round((time.monotonic() - run.t0) * 1000, 1)
                    if key == "crl_ms":
                        entries = len(crl)
                        out["crl_entries"] = entries
                        out["crl_bytes"] = len(r.content)
                        out["crl_bytes_per_entry"] = round(len(r.content) / max(entries, 1), 1)
                    break
                if time.monotonic() - run.t0 > 120:
                    out[key] = None
                    break
                time.sleep(0.05)
    # Per-certificate rows (feed, OCSP, certificate and device status).
    from fleettrust.services import revocation as rev

    op_id = run.figures["operation_id"]
    while rev.operation_status(run.ctx, run.admin, op_id)["state"] != "done":
        if time.monotonic() - run.t0 > 300:
            break
        time.sleep(0.05)
    out["rows_written_ms"] = round((time.monotonic() - run.t0) * 1000, 1)
    return out


SECTIONS: list[Section] = [Section("revocation-core", _core_measure, _core_prepare)]


# --- the run ------------------------------------------------------------------------------------


def bench_backend(backend: str, devices: int, pg_url: str) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-rev-{backend}-"))
    run, cleanup = build(backend, devices, workdir, pg_url)
    gateway = start_gateway(run)
    try:
        with ApiServer(run):
            for section in SECTIONS:
                if section.prepare is not None:
                    section.prepare(run)
            results: dict[str, dict[str, Any]] = {}
            with httpx.Client(base_url=run.api_url, timeout=60) as c:
                c.get("/healthz")
                t_call = time.monotonic()
                r = c.post(f"/v1/revocation/batches/{run.batch_id}",
                           json={"reason": "keyCompromise"},
                           headers={"Authorization": f"Bearer {run.token}"})
                run.t0 = time.monotonic()
                run.figures["_t0_wall"] = time.time()
            r.raise_for_status()
            body = r.json()
            run.figures["operation_id"] = body["operation_id"]
            api_ms = round((run.t0 - t_call) * 1000, 1)

            def go(section: Section) -> None:
                results[section.name] = section.measure(run)

            threads = [threading.Thread(target=go, args=(s,)) for s in SECTIONS]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for section in SECTIONS:
                if section.finish is not None:
                    section.finish(run)
    finally:
        gateway.terminate()
        gateway.wait(15)
        if gateway.stdout is not None:
            gateway.stdout.close()
        run.ctx.close()
        cleanup()
    report: dict[str, Any] = {"backend": backend, "devices": devices,
                              "covered": body["covered"], "newly_revoked": body["newly_revoked"],
                              "api_ms": api_ms}
    for name in results:
        report.update(results[name])
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--devices", type=int, default=100_000)
    ap.add_argument("--pg-url", default=os.environ.get("FLEETTRUST_TEST_PG_URL", DEFAULT_PG_URL))
    ap.add_argument("--json", action="store_true", help="print one JSON object per backend")
    args = ap.parse_args(argv)
    if args.devices < PROBES + 1:
        ap.error(f"--devices must be at least {PROBES + 1}")
    backends = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for backend in backends:
        report = bench_backend(backend, args.devices, args.pg_url)
        if args.json:
            print(json.dumps(report))
        else:
            print(f"{backend}: " + ", ".join(f"{k}={v}" for k, v in report.items()
                                              if k != "backend"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
