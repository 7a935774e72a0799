"""Benchmark: bulk device issuance through the real service path vs. a pure signing loop.

What is timed (per backend): ``fleettrust.services.issuance.issue_devices`` called with requests
of ``--chunk`` devices until ``--count`` certificates exist. That is the whole server-side path
minus HTTP: authorisation and batch checks, CSR parsing and signature verification, key policy,
manifest normalisation and hash, duplicate checks against the database, the atomic
batch-capacity reservation, signing with the factory CA key from the encrypted file key store,
and the INSERTs of devices, certificates, hardware identifiers and one audit event per device,
committed per request.

What it is compared with, measured in the same run on the same CSRs' public keys: a pure
``cryptography`` build-and-sign loop of the same device profile (same extensions in the same
order, P-256 issuer key, ECDSA-SHA256, 159-bit random serials; no CSR verification, no policy,
no database). It is run in both of cryptography's builder styles (chained methods and the
constructor) before and after the service run; the fastest of those runs is the reference, so
machine noise can only lower the ratio, never flatter it.

Not timed: key generation and CSR creation (the device's work), the hierarchy ceremony.

The process pins itself to one CPU (``--cpus``, default 0) so the figures are per core; the
PostgreSQL server is a separate process and is not pinned. Wall-clock rates are the headline;
CPU-time rates (``time.process_time``) are printed too because they are much less sensitive to
other load on a shared machine (for PostgreSQL they exclude the server's own work).

    .venv/bin/python bench/issuance.py --db both --count 20000
"""

from __future__ import annotations

import argparse
import cProfile
import datetime as dt
import io
import os
import pstats
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import (
    AuthorityInformationAccessOID,
    ExtendedKeyUsageOID,
    ExtensionOID,
    NameOID,
)

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ROOT_PASSPHRASE = b"bench root passphrase"


@dataclass
class Workload:
    csrs: list[bytes]
    manifests: list[dict[str, Any]]
    public_keys: list[ec.EllipticCurvePublicKey]


def make_workload(count: int) -> Workload:
    """Device-side work, done before any timing: key pairs, CSRs and hardware manifests."""
    csrs: list[bytes] = []
    manifests: list[dict[str, Any]] = []
    public_keys: list[ec.EllipticCurvePublicKey] = []
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device")])
    for n in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
        csrs.append(csr.public_bytes(serialization.Encoding.PEM))
        public_keys.append(key.public_key())
        manifests.append({
            "cpu_serial": f"CPU{n:012d}",
            "mac_addresses": [f"02:{(n >> 24) & 255:02x}:{(n >> 16) & 255:02x}:"
                              f"{(n >> 8) & 255:02x}:{n & 255:02x}:01"],
            "wlan_module_id": f"WL-{n:08d}",
        })
    return Workload(csrs, manifests, public_keys)


# --- the pure cryptography loop ------------------------------------------------------------------


@dataclass
class Rate:
    wall: float  # certificates per second, wall clock
    cpu: float  # certificates per second of this process's CPU time


def _hw_module_name(device_id: str, hw_type_der: bytes) -> x509.OtherName:
    sn = device_id.encode()
    inner = hw_type_der + bytes((0x04, len(sn))) + sn
    return x509.OtherName(x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4"),
                          bytes((0x30, len(inner))) + inner)


def pure_loop(public_keys: list[ec.EllipticCurvePublicKey], batch_id: str, *,
              constructor: bool, base_url: str = "http://127.0.0.1:8080",
              ) -> tuple[Rate, x509.Certificate]:
    """Build and sign one device certificate per key with plain ``cryptography``.

    Same profile as ``pki.DeviceProfile.issue``: BC cA=FALSE critical, KU digitalSignature
    critical, EKU clientAuth, SKI, AKI, SAN hardwareModuleName, CRL DP (shard by serial), AIA
    (OCSP + caIssuers), the device-binding extension. Returns (rate, last certificate).
    """
    from fleettrust.pki import _der, oids

    issuer_key = ec.generate_private_key(ec.SECP256R1())
    issuer_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleettrust fleet"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "Bench Issuing CA")])
    org = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fleettrust fleet")
    aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
    aia = x509.AuthorityInformationAccess([
        x509.AccessDescription(AuthorityInformationAccessOID.OCSP,
                               x509.UniformResourceIdentifier(f"{base_url}/ocsp")),
        x509.AccessDescription(AuthorityInformationAccessOID.CA_ISSUERS,
                               x509.UniformResourceIdentifier(f"{base_url}/ca/x.der")),
    ])
    ku = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=False,
                       crl_sign=False, encipher_only=False, decipher_only=False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    bc = x509.BasicConstraints(ca=False, path_length=None)
    hw_type_der = _der.oid(oids.HW_TYPE.dotted_string)
    crl = [x509.CRLDistributionPoints([x509.DistributionPoint(
        [x509.UniformResourceIdentifier(f"{base_url}/crl/x/{s}.crl")], None, None, None)])
        for s in range(16)]
    # Constant extensions wrapped once (what a careful pure loop would do).
    e_bc = x509.Extension(ExtensionOID.BASIC_CONSTRAINTS, True, bc)
    e_ku = x509.Extension(ExtensionOID.KEY_USAGE, True, ku)
    e_eku = x509.Extension(ExtensionOID.EXTENDED_KEY_USAGE, False, eku)
    e_aki = x509.Extension(ExtensionOID.AUTHORITY_KEY_IDENTIFIER, False, aki)
    e_aia = x509.Extension(ExtensionOID.AUTHORITY_INFORMATION_ACCESS, False, aia)
    e_crl = [x509.Extension(ExtensionOID.CRL_DISTRIBUTION_POINTS, False, c) for c in crl]
    bid = batch_id.encode()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None)
    nb, na = now - dt.timedelta(minutes=5), now + dt.timedelta(days=3650)
    sha256 = hashes.SHA256()
    cert = None
    w0, c0 = time.perf_counter(), time.process_time()
    for i, pk in enumerate(public_keys):
        serial = int.from_bytes(secrets.token_bytes(20), "big") >> 1 or 1
        device_id = f"d-{i:012d}"
        mh = secrets.token_bytes(32)  # stands in for the manifest hash
        body = bytes((0x02, 1, 1)) + bytes((0x0C, len(bid))) + bid + bytes((0x04, 32)) + mh
        binding = x509.UnrecognizedExtension(oids.DEVICE_BINDING,
                                             bytes((0x30, len(body))) + body)
        subject = x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
        ski = x509.SubjectKeyIdentifier.from_public_key(pk)
        san = x509.SubjectAlternativeName([_hw_module_name(device_id, hw_type_der)])
        if constructor:
            builder = x509.CertificateBuilder(
                issuer_name=issuer_name, subject_name=subject, public_key=pk,
                serial_number=serial, not_valid_before=nb, not_valid_after=na,
                extensions=[
                    e_bc, e_ku, e_eku,
                    x509.Extension(ExtensionOID.SUBJECT_KEY_IDENTIFIER, False, ski),
                    e_aki,
                    x509.Extension(ExtensionOID.SUBJECT_ALTERNATIVE_NAME, False, san),
                    e_crl[serial % 16], e_aia,
                    x509.Extension(oids.DEVICE_BINDING, False, binding),
                ])
        else:
            builder = (
                x509.CertificateBuilder()
                .issuer_name(issuer_name).subject_name(subject).public_key(pk)
                .serial_number(serial).not_valid_before(nb).not_valid_after(na)
                .add_extension(bc, critical=True)
                .add_extension(ku, critical=True)
                .add_extension(eku, critical=False)
                .add_extension(ski, critical=False)
                .add_extension(aki, critical=False)
                .add_extension(san, critical=False)
                .add_extension(crl[serial % 16], critical=False)
                .add_extension(aia, critical=False)
                .add_extension(binding, critical=False)
            )
        cert = builder.sign(issuer_key, sha256)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    assert cert is not None
    return Rate(len(public_keys) / wall, len(public_keys) / cpu), cert


def best_pure(work: Workload, batch_id: str, rounds: int = 1) -> tuple[Rate, str, x509.Certificate]:
    """The fastest pure loop over both builder styles (``rounds`` runs each)."""
    best: tuple[Rate, str, x509.Certificate] | None = None
    for _ in range(rounds):
        for constructor in (False, True):
            rate, cert = pure_loop(work.public_keys, batch_id, constructor=constructor)
            if best is None or rate.wall > best[0].wall:
                best = (rate, "constructor" if constructor else "chained", cert)
    assert best is not None
    return best


# --- the service path -------------------------------------------------------------------------


@contextmanager
def phase_timer(enabled: bool) -> Iterator[dict[str, float]]:
    """CPU time per phase of the service path (wraps the service's own steps; --phases)."""
    totals: dict[str, float] = {}
    if not enabled:
        yield totals
        return
    import gc

    from fleettrust import pki
    from fleettrust.services import issuance

    originals: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, name: str, label: str) -> None:
        func = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.process_time()
            try:
                return func(*args, **kwargs)
            finally:
                totals[label] = totals.get(label, 0.0) + time.process_time() - t

        originals.append((owner, name, func))
        setattr(owner, name, timed)

    wrap(issuance, "issue_devices", "total")
    wrap(issuance, "_prepare_all", "parse + verify CSRs, key policy, manifests")
    wrap(pki.DeviceProfile, "issue", "build + sign certificates")
    wrap(issuance._BulkWriter, "insert", "INSERT/COPY rows")
    wrap(issuance, "_hardware_conflicts", "hardware-id lookups")
    wrap(issuance, "_database_conflicts", "device-id / key-reuse lookups")
    wrap(issuance, "_issuing_context", "batch + authorisation checks")
    started = [0.0]

    def on_gc(phase: str, _info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            totals["(garbage collector, inside the above)"] = totals.get(
                "(garbage collector, inside the above)", 0.0) + time.process_time() - started[0]

    gc.callbacks.append(on_gc)
    try:
        yield totals
    finally:
        gc.callbacks.remove(on_gc)
        for owner, name, func in originals:
            setattr(owner, name, func)


@contextmanager
def database(kind: str, tmp: Path, pg_url: str) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp / 'bench.db'}"
        return
    from sqlalchemy import create_engine, text

    schema = "bench_" + secrets.token_hex(6)
    admin = create_engine(pg_url)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in pg_url else "?"
    try:
        yield f"{pg_url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@dataclass
class ServiceRun:
    rate: Rate
    issued: int
    elapsed: float
    batch_id: str
    sample: x509.Certificate
    profile_text: str | None


def service_run(kind: str, work: Workload, chunk: int, pg_url: str,
                profile_top: int, phases: bool = False) -> ServiceRun:
    from fleettrust import ceremony
    from fleettrust.config import Settings
    from fleettrust.services import hierarchy, issuance
    from fleettrust.services.auth import Principal, create_token
    from fleettrust.services.context import ServiceContext
    from fleettrust.storage.db import make_engine
    from fleettrust.storage.migrate import upgrade

    os.environ.setdefault("FLEETTRUST_KEYSTORE_PASSPHRASE", "bench key-store passphrase")
    with tempfile.TemporaryDirectory(prefix="ft-bench-") as tmp_s:
        tmp = Path(tmp_s)
        with database(kind, tmp, pg_url) as url:
            settings = Settings(data_dir=tmp / "data", database_url=url,
                                max_bulk_items=max(chunk, 10_000))
            settings.data_dir.mkdir()
            engine = make_engine(url)
            upgrade(engine)
            engine.dispose()
            ctx = ServiceContext.create(settings)
            try:
                def principal(role: str, subject: str, factory_id: str | None = None) -> Principal:
                    with ctx.transaction() as s:
                        row, _ = create_token(s, role=role, subject=subject,
                                              now=ctx.clock.now(), factory_id=factory_id)
                        return Principal(row.id, role, subject, factory_id, "127.0.0.1")

                admin = principal("admin", "bench")
                now = dt.datetime.now(dt.UTC)
                info = ceremony.init_root(tmp / "root", passphrase=ROOT_PASSPHRASE, now=now)
                csr = hierarchy.create_fleet_csr(ctx, admin, "Fleet CA")
                fleet = ceremony.sign_ca_csr(tmp / "root", csr.encode(),
                                             passphrase=ROOT_PASSPHRASE, now=now)
                hierarchy.import_fleet_certificate(
                    ctx, admin, fleet.public_bytes(serialization.Encoding.PEM).decode(),
                    info.certificate.public_bytes(serialization.Encoding.PEM).decode())
                fac = hierarchy.create_factory(ctx, admin, name="Bench Factory")
                station = principal("factory", "bench-station", fac.factory.id)
                batch = hierarchy.create_batch(
                    ctx, station, fac.factory.id, name="bench", product_model="B-1",
                    hardware_revision="r1", planned_size=len(work.csrs),
                    manufactured_on=dt.date.today()).batch
                requests = [issuance.IssueRequest(csr=c, manifest=m, station="line-1")
                            for c, m in zip(work.csrs, work.manifests, strict=True)]
                # One warm-up request outside the timing (imports, caches, prepared statements).
                issuance.issue_devices(ctx, station, batch.id, requests[:1])
                requests = requests[1:]
                prof = cProfile.Profile() if profile_top else None
                issued = 1
                last: issuance.IssueResult | None = None
                with phase_timer(phases) as totals:
                    w0, c0 = time.perf_counter(), time.process_time()
                    if prof is not None:
                        prof.enable()
                    for i in range(0, len(requests), chunk):
                        last = issuance.issue_devices(ctx, station, batch.id,
                                                      requests[i : i + chunk])
                        issued += len(last.devices)
                    if prof is not None:
                        prof.disable()
                    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                assert last is not None
                text_out = None
                if prof is not None:
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(profile_top)
                    text_out = buf.getvalue()
                if totals:
                    n = len(requests)
                    lines = [f"  {v / n * 1e6:7.1f} us  {k}"
                             for k, v in sorted(totals.items(), key=lambda kv: -kv[1])]
                    text_out = (text_out or "") + (
                        "CPU time per certificate by phase (this process only):\n"
                        + "\n".join(lines))
                _check_db(ctx, batch.id, len(work.csrs))
                sample = x509.load_pem_x509_certificate(last.devices[-1].certificate_pem.encode())
                n = len(requests)
                return ServiceRun(Rate(n / wall, n / cpu), issued, wall, batch.id, sample,
                                  text_out)
            finally:
                ctx.close()


def _check_db(ctx: Any, batch_id: str, expected: int) -> None:
    """The run really stored what it claims: rows and audit events per device."""
    from sqlalchemy import func, select

    from fleettrust.storage.models import AuditEvent, Batch, Certificate, Device

    with ctx.transaction() as s:
        devices = s.scalar(select(func.count()).select_from(Device))
        certs = s.scalar(select(func.count()).select_from(Certificate)
                         .where(Certificate.kind == "device"))
        events = s.scalar(select(func.count()).select_from(AuditEvent)
                          .where(AuditEvent.action == "device.manufactured"))
        issued = s.get(Batch, batch_id).issued_count
    if not devices == certs == events == issued == expected:
        raise SystemExit(f"database check failed: devices={devices} certificates={certs} "
                         f"audit={events} batch.issued_count={issued} expected={expected}")


def _same_profile(a: x509.Certificate, b: x509.Certificate) -> None:
    oids_a = [(e.oid.dotted_string, e.critical) for e in a.extensions]
    oids_b = [(e.oid.dotted_string, e.critical) for e in b.extensions]
    if oids_a != oids_b:
        raise SystemExit(f"pure loop profile differs from the service's:\n{oids_a}\n{oids_b}")
    if (a.signature_algorithm_oid, a.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )[:30]) != (b.signature_algorithm_oid, b.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)[:30]):
        raise SystemExit("pure loop signs with another algorithm or key type")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--count", type=int, default=20_000, help="certificates per backend")
    ap.add_argument("--chunk", type=int, default=1000, help="devices per request")
    ap.add_argument("--repeat", type=int, default=1,
                    help="service runs per backend (fresh database each); the best is reported")
    ap.add_argument("--pg-url", default=os.environ.get("FLEETTRUST_TEST_PG_URL", DEFAULT_PG_URL))
    ap.add_argument("--cpus", default="0",
                    help="CPUs to pin this process to, e.g. '0' or '0,1'; 'none' to not pin")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print the N most expensive functions of the service run (cProfile)")
    ap.add_argument("--phases", action="store_true",
                    help="print CPU time per certificate for each step of the service path")
    args = ap.parse_args(argv)
    if args.count < 2:
        ap.error("--count must be at least 2")
    if args.cpus != "none" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    import cryptography
    import sqlalchemy

    print(f"python {sys.version.split()[0]}, cryptography {cryptography.__version__}, "
          f"sqlalchemy {sqlalchemy.__version__}; {cpus} CPU(s) for this process; "
          f"count={args.count} chunk={args.chunk}")
    t0 = time.perf_counter()
    work = make_workload(args.count)
    print(f"pre-generated {args.count} device keys + CSRs + manifests in "
          f"{time.perf_counter() - t0:.1f}s (not timed)")
    backends = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    for kind in backends:
        pure_before, style_b, _ = best_pure(work, "bat_warmup")
        runs = [service_run(kind, work, args.chunk, args.pg_url, args.profile, args.phases)
                for _ in range(args.repeat)]
        run = max(runs, key=lambda r: r.rate.wall)
        pure_after, style_a, pure_cert = best_pure(work, run.batch_id)
        _same_profile(run.sample, pure_cert)
        pure, style = max(((pure_before, style_b), (pure_after, style_a)),
                          key=lambda p: p[0].wall)
        pure_cpu = max(pure_before.cpu, pure_after.cpu)
        print(f"{kind:>10}: service {run.rate.wall:7.0f} cert/s wall ({run.issued} issued in "
              f"{run.elapsed:.1f}s), {run.rate.cpu:7.0f} cert/s of CPU time")
        print(f"{'':>10}  pure cryptography loop {pure.wall:7.0f} cert/s wall ({style} "
              f"builder), {pure_cpu:7.0f} cert/s of CPU time")
        print(f"{'':>10}  ratio service/pure: {run.rate.wall / pure.wall:.2f} (wall), "
              f"{run.rate.cpu / pure_cpu:.2f} (CPU time"
              f"{', client side only' if kind == 'postgresql' else ''})")
        if run.profile_text:
            print(run.profile_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
