"""Benchmark: bulk device issuance through the real service path vs. a pure signing loop.

What is timed (per backend): ``fleettrust.services.issuance.issue_devices`` called with requests
of ``--chunk`` devices until ``--count`` certificates exist. That is the whole server-side path
minus HTTP: CSR parsing and signature verification, key policy, manifest normalisation and hash,
duplicate checks against the database, the atomic batch-capacity reservation, signing with the
factory CA key from the encrypted file key store, and the INSERTs of devices, certificates,
hardware identifiers and one audit event per device, committed per request.

What it is compared with, measured in the same run on the same CSRs: a pure ``cryptography``
build-and-sign loop of the same device profile (same extensions in the same order, same issuer
key type, P-256 subject keys taken from the same CSRs, no CSR verification, no policy, no
database). The ratio service/pure is the figure of merit (goal named by the issue: >= 0.6).

Not timed: key generation and CSR creation (the device's work), the hierarchy ceremony.

The process pins itself to one CPU (``--cpus``, default one) so "per core" is honest; the
PostgreSQL server is a separate process and is not pinned.

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
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

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


def _hw_module_name(device_id: str, hw_type_der: bytes) -> x509.OtherName:
    sn = device_id.encode()
    inner = hw_type_der + bytes((0x04, len(sn))) + sn
    return x509.OtherName(x509.ObjectIdentifier("1.3.6.1.5.5.7.8.4"),
                          bytes((0x30, len(inner))) + inner)


def pure_loop(public_keys: list[ec.EllipticCurvePublicKey], batch_id: str,
              base_url: str = "http://127.0.0.1:8080") -> tuple[float, x509.Certificate]:
    """Build and sign one device certificate per key with plain ``cryptography``.

    Same profile as ``pki.DeviceProfile.issue``: BC cA=FALSE critical, KU digitalSignature
    critical, EKU clientAuth, SKI, AKI, SAN hardwareModuleName, CRL DP (shard by serial), AIA
    (OCSP + caIssuers), the device-binding extension; P-256 issuer, ECDSA-SHA256, 159-bit
    random serials. Returns (certificates per second, last certificate).
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
    crl = {s: x509.CRLDistributionPoints([x509.DistributionPoint(
        [x509.UniformResourceIdentifier(f"{base_url}/crl/x/{s}.crl")], None, None, None)])
        for s in range(16)}
    bid = batch_id.encode()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0, tzinfo=None)
    nb, na = now - dt.timedelta(minutes=5), now + dt.timedelta(days=3650)
    cert = None
    t0 = time.perf_counter()
    for i, pk in enumerate(public_keys):
        serial = int.from_bytes(secrets.token_bytes(20), "big") >> 1 or 1
        device_id = f"d-{i:012d}"
        mh = secrets.token_bytes(32)  # stands in for the manifest hash
        binding = (bytes((0x02, 1, 1)) + bytes((0x0C, len(bid))) + bid
                   + bytes((0x04, 32)) + mh)
        cert = (
            x509.CertificateBuilder()
            .issuer_name(issuer_name)
            .subject_name(x509.Name([org, x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .public_key(pk)
            .serial_number(serial)
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(bc, critical=True)
            .add_extension(ku, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pk), critical=False)
            .add_extension(aki, critical=False)
            .add_extension(x509.SubjectAlternativeName([_hw_module_name(device_id, hw_type_der)]),
                           critical=False)
            .add_extension(crl[serial % 16], critical=False)
            .add_extension(aia, critical=False)
            .add_extension(x509.UnrecognizedExtension(
                oids.DEVICE_BINDING, bytes((0x30, len(binding))) + binding), critical=False)
            .sign(issuer_key, hashes.SHA256())
        )
    elapsed = time.perf_counter() - t0
    assert cert is not None
    return len(public_keys) / elapsed, cert


# --- the service path -------------------------------------------------------------------------


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
    rate: float
    issued: int
    elapsed: float
    batch_id: str
    sample: x509.Certificate
    profile_text: str | None


def service_run(kind: str, work: Workload, chunk: int, pg_url: str,
                profile_top: int) -> ServiceRun:
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
                warm = requests[:1]
                requests = requests[1:]
                issuance.issue_devices(ctx, station, batch.id, warm)
                prof = cProfile.Profile() if profile_top else None
                issued = 1
                last: issuance.IssueResult | None = None
                t0 = time.perf_counter()
                if prof is not None:
                    prof.enable()
                for i in range(0, len(requests), chunk):
                    last = issuance.issue_devices(ctx, station, batch.id,
                                                  requests[i : i + chunk])
                    issued += len(last.devices)
                if prof is not None:
                    prof.disable()
                elapsed = time.perf_counter() - t0
                assert last is not None
                text_out = None
                if prof is not None:
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(profile_top)
                    text_out = buf.getvalue()
                _check_db(ctx, batch.id, len(work.csrs))
                sample = x509.load_pem_x509_certificate(last.devices[-1].certificate_pem.encode())
                return ServiceRun(len(requests) / elapsed, issued, elapsed, batch.id, sample,
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--count", type=int, default=20_000, help="certificates per backend")
    ap.add_argument("--chunk", type=int, default=1000, help="devices per request")
    ap.add_argument("--pg-url", default=os.environ.get("FLEETTRUST_TEST_PG_URL", DEFAULT_PG_URL))
    ap.add_argument("--cpus", default="0",
                    help="CPUs to pin this process to, e.g. '0' or '0,1'; 'none' to not pin")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print the N most expensive functions (cProfile, tottime)")
    args = ap.parse_args(argv)
    if args.count < 2:
        ap.error("--count must be at least 2")
    if args.cpus != "none" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    import cryptography

    print(f"python {sys.version.split()[0]}, cryptography {cryptography.__version__}, "
          f"{cpus} CPU(s) for this process, count={args.count}, chunk={args.chunk}")
    t0 = time.perf_counter()
    work = make_workload(args.count)
    print(f"pre-generated {args.count} device keys + CSRs in {time.perf_counter() - t0:.1f}s "
          "(not timed)")
    backends = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    results: list[tuple[str, float, float]] = []
    for kind in backends:
        run = service_run(kind, work, args.chunk, args.pg_url, args.profile)
        pure, pure_cert = pure_loop(work.public_keys, run.batch_id)
        _same_profile(run.sample, pure_cert)
        ratio = run.rate / pure
        results.append((kind, run.rate, pure))
        print(f"{kind:>10}: service {run.rate:8.0f} cert/s ({run.issued} issued, "
              f"{run.elapsed:.2f}s) | pure cryptography loop {pure:8.0f} cert/s | "
              f"ratio {ratio:.2f}")
        if run.profile_text:
            print(run.profile_text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
