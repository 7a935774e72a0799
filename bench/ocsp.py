"""Benchmark: OCSP responses per second and latency (p50/p99), 50 kept-alive connections.

These servers are measured in the same run, on the same machine, with the same client
(``wrk``, POSTing one fixed nonce-less SHA-1 request for a good device certificate), in
interleaved rounds (a, b, c, d, d', a, b, ...; medians reported, ratios are medians of the
per-round ratios) because the project machine is shared and its load varies by the second:

(a) ``openssl ocsp -multi 2`` answering from an ``index.txt`` built from the fleettrust database
    (every certificate of the issuing CA, revoked ones with time and reason), signing with the
    same delegated responder certificate and (encrypted) key fleettrust uses, nextUpdate 60 min;
(b) a plain ASGI endpoint under ``uvicorn --workers 2`` that reads the request body and returns
    fixed bytes (a real OCSP response) with the same headers: the ceiling for any Python ASGI
    responder on this machine;
(c) fleettrust's responder, ``uvicorn --workers 2 --factory
    fleettrust.api.ocsp_routes:build_ocsp_app_from_env`` (the standalone OCSP app; each worker
    has its own pre-signed cache and revocation index, as in production);
(d) for information: the operator app (``create_app`` + ``include_router(ocsp_routes.router)``)
    with 2 workers, i.e. the OCSP route behind FastAPI's middleware stack and router, as is
    and wrapped in ``OcspFastPath`` (cached POSTs answered before the FastAPI stack).

Every server's answer is checked (parsed, status ``good``, right serial) before it is timed.
``openssl ocsp`` spins at 100% CPU forever once a client connects and closes without sending
(wrk's default address probe does exactly that, and so does the end of a kept-alive run), so:
the Lua script overrides ``wrk.resolve`` to skip the probe, readiness is detected from
``/proc/net/tcp`` instead of a test connection, the check uses its own responder instance, and
every timed run gets a fresh responder that is killed afterwards. uvicorn servers are started
once, checked and warmed up (their caches fill on the first request each worker sees), and stay
up (idle) between their runs. Every uvicorn server uses the same HTTP protocol class
(``FastHttpToolsProtocol``: TCP_NODELAY, one send() per response; ``--stock-http`` for uvicorn's).

Besides responses/s, the table gives the server's CPU time per response (user + system time of
all its processes over the run, from /proc): it does not depend on how much CPU other processes
on the host leave to the run, so it is the steadier comparison on a busy machine.

Goals named by the issue: fleettrust >= 2.5x openssl, >= 0.85x the plain endpoint, p99 <= 2 ms.

    .venv/bin/python bench/ocsp.py                  # SQLite, 7 rounds of 4 s per server
    .venv/bin/python bench/ocsp.py --db postgresql --duration 15 --json out.json

Loopback only; every child process is killed at the end (bounded by --duration per run).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp as cocsp

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
ROOT_PASSPHRASE = b"bench root passphrase"
KEYSTORE_PASSPHRASE = "bench key-store passphrase"
ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
#: The same HTTP protocol for every uvicorn server measured: httptools with TCP_NODELAY (stock
#: uvicorn --workers N leaves Nagle on without uvloop: ~40 ms per response) and one send() per
#: response; see fleettrust.api.ocsp_routes.FastHttpToolsProtocol. --stock-http measures with
#: uvicorn's own httptools protocol instead.
HTTP_PROTOCOL = ["fleettrust.api.ocsp_routes:FastHttpToolsProtocol"]

WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/ocsp-request"
local f = assert(io.open(os.getenv("OCSP_BENCH_REQUEST"), "rb"))
wrk.body = f:read("*a")
f:close()

-- wrk's default resolve() test-connects to every address and closes without sending a
-- request; `openssl ocsp` then spins at 100% CPU forever. Take the address as given.
function wrk.resolve(host, service)
   wrk.addrs = wrk.lookup(host, service)
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "WRKJSON {\"requests\": %d, \"duration_us\": %d, \"p50_us\": %d, \"p90_us\": %d, " ..
      "\"p99_us\": %d, \"max_us\": %d, \"connect\": %d, \"read\": %d, \"write\": %d, " ..
      "\"status\": %d, \"timeout\": %d}\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
"""

PLAIN_APP = '''
"""Plain ASGI endpoint: read the request body, return fixed bytes (benchmark ceiling)."""
import os

BODY = open(os.environ["OCSP_BENCH_RESPONSE"], "rb").read()
HEADERS = [
    (b"content-type", b"application/ocsp-response"),
    (b"content-length", str(len(BODY)).encode()),
    (b"cache-control", b"max-age=60, public, no-transform, must-revalidate"),
    (b"expires", b"Thu, 01 Jan 2099 00:00:00 GMT"),
    (b"last-modified", b"Thu, 01 Jan 2026 00:00:00 GMT"),
    (b"etag", b'"0123456789abcdef0123456789abcdef"'),
]


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    message = await receive()
    while message.get("more_body"):
        message = await receive()
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})
'''

OPERATOR_APP = '''
"""The operator app with the OCSP router included (and, for `build_fast`, wrapped in
OcspFastPath)."""


def build():
    from fleettrust.api.app import create_app
    from fleettrust.api.ocsp_routes import router
    from fleettrust.config import Settings
    from fleettrust.services.context import ServiceContext

    app = create_app(ServiceContext.create(Settings.load()))
    app.include_router(router)
    return app


def build_fast():
    from fleettrust.api.ocsp_routes import OcspFastPath

    return OcspFastPath(build())
'''


# --- the PKI under test -----------------------------------------------------------------------


@dataclass
class Setup:
    env: dict[str, str]
    ca_id: str
    issuer: x509.Certificate
    good: x509.Certificate
    request: Path
    response: Path
    index: Path
    ca_pem: Path
    responder_pem: Path
    responder_key: Path
    devices: int
    revoked: int


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


def _index_time(value: dt.datetime) -> str:
    value = min(value.astimezone(dt.UTC), dt.datetime(2049, 12, 31, tzinfo=dt.UTC))
    return value.strftime("%y%m%d%H%M%SZ")


def write_openssl_index(ctx: Any, ca_id: str, path: Path) -> None:
    """openssl ``ca``/``ocsp`` index.txt of every certificate ``ca_id`` issued."""
    from sqlalchemy import select

    from fleettrust.storage.models import Certificate

    lines = []
    with ctx.sessions() as s:
        for row in s.scalars(select(Certificate).where(Certificate.ca_id == ca_id)):
            serial = row.serial_hex.upper()
            serial = "0" * (len(serial) % 2) + serial
            subject = "/CN=" + (row.device_id or row.kind)
            if row.status == "good":
                lines.append(f"V\t{_index_time(row.not_after)}\t\t{serial}\tunknown\t{subject}")
            else:
                reason = "certificateHold" if row.status == "hold" else (
                    row.revocation_reason or "unspecified")
                revoked = _index_time(row.revoked_at or row.created_at)
                lines.append(f"R\t{_index_time(row.not_after)}\t{revoked},{reason}\t{serial}"
                             f"\tunknown\t{subject}")
    path.write_text("\n".join(lines) + "\n")


def setup_pki(tmp: Path, db_url: str, n_devices: int, n_revoked: int) -> Setup:
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleettrust import ceremony
    from fleettrust.config import Settings
    from fleettrust.revocation.ocsp_responder import OcspResponder, ensure_responder_credential
    from fleettrust.services import hierarchy, issuance, revocation
    from fleettrust.services.auth import Principal, create_token
    from fleettrust.services.context import ServiceContext
    from fleettrust.storage.db import make_engine
    from fleettrust.storage.migrate import upgrade

    os.environ["FLEETTRUST_KEYSTORE_PASSPHRASE"] = KEYSTORE_PASSPHRASE
    data = tmp / "data"
    data.mkdir(mode=0o700)
    settings = Settings(data_dir=data, database_url=db_url)
    engine = make_engine(db_url)
    upgrade(engine)
    engine.dispose()
    ctx = ServiceContext.create(settings)
    try:
        def principal(role: str, subject: str, factory_id: str | None = None) -> Principal:
            with ctx.transaction() as s:
                row, _ = create_token(s, role=role, subject=subject, now=ctx.clock.now(),
                                      factory_id=factory_id)
                return Principal(row.id, role, subject, factory_id, "127.0.0.1")

        admin = principal("admin", "bench")
        now = dt.datetime.now(dt.UTC)
        info = ceremony.init_root(tmp / "root", passphrase=ROOT_PASSPHRASE, now=now)
        csr = hierarchy.create_fleet_csr(ctx, admin, "Fleet CA")
        fleet = ceremony.sign_ca_csr(tmp / "root", csr.encode(), passphrase=ROOT_PASSPHRASE,
                                     now=now)
        hierarchy.import_fleet_certificate(
            ctx, admin, fleet.public_bytes(serialization.Encoding.PEM).decode(),
            info.certificate.public_bytes(serialization.Encoding.PEM).decode())
        fac = hierarchy.create_factory(ctx, admin, name="Bench Factory")
        station = principal("factory", "bench-station", fac.factory.id)
        batch = hierarchy.create_batch(
            ctx, station, fac.factory.id, name="bench", product_model="B-1",
            hardware_revision="r1", planned_size=n_devices, manufactured_on=dt.date.today()).batch
        name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "device")])
        reqs = []
        for n in range(n_devices):
            key = ec.generate_private_key(ec.SECP256R1())
            c = x509.CertificateSigningRequestBuilder().subject_name(name).sign(
                key, hashes.SHA256())
            reqs.append(issuance.IssueRequest(
                csr=c.public_bytes(serialization.Encoding.PEM),
                manifest={"cpu_serial": f"CPU{n:012d}", "wlan_module_id": f"WL-{n:08d}"}))
        issued = issuance.issue_devices(ctx, station, batch.id, reqs).devices
        for d in issued[1:1 + n_revoked]:
            revocation.revoke_device(ctx, admin, d.device_id, reason="keyCompromise")
        ca_id = batch.ca_id
        cred = ensure_responder_credential(ctx, ca_id)
        assert cred is not None
        from fleettrust.services.hierarchy import load_ca_cert
        from fleettrust.storage.models import CertificateAuthority, ServerCredential

        with ctx.sessions() as s:
            ca_row = s.get(CertificateAuthority, ca_id)
            assert ca_row is not None
            issuer = load_ca_cert(ca_row)
            key_id = s.get(ServerCredential, cred.credential_id).key_id  # type: ignore[union-attr]
        good = x509.load_pem_x509_certificate(issued[0].certificate_pem.encode())
        request = tmp / "request.der"
        request.write_bytes(
            cocsp.OCSPRequestBuilder().add_certificate(good, issuer, hashes.SHA1())  # noqa: S303
            .build().public_bytes(serialization.Encoding.DER))
        # a real response for the plain endpoint to return
        responder = OcspResponder(ctx, sync_index=False)
        response = tmp / "response.der"
        response.write_bytes(responder.resolve(request.read_bytes()).body)
        responder.close()
        index = tmp / "index.txt"
        write_openssl_index(ctx, ca_id, index)
        ca_pem = tmp / "ca.pem"
        ca_pem.write_bytes(issuer.public_bytes(serialization.Encoding.PEM))
        responder_pem = tmp / "responder.pem"
        responder_pem.write_bytes(x509.load_der_x509_certificate(cred.certificate_der)
                                  .public_bytes(serialization.Encoding.PEM))
        from fleettrust.signing.filekeys import FileKeyStore

        key_path = FileKeyStore(settings.keys_dir, KEYSTORE_PASSPHRASE.encode()).path_for(key_id)
    finally:
        ctx.close()
    env = {
        "FLEETTRUST_DATA_DIR": str(data),
        "FLEETTRUST_DATABASE_URL": db_url,
        "FLEETTRUST_KEYSTORE_PASSPHRASE": KEYSTORE_PASSPHRASE,
        "OCSP_BENCH_REQUEST": str(request),
        "OCSP_BENCH_RESPONSE": str(response),
    }
    return Setup(env=env, ca_id=ca_id, issuer=issuer, good=good, request=request,
                 response=response, index=index, ca_pem=ca_pem, responder_pem=responder_pem,
                 responder_key=key_path, devices=n_devices, revoked=n_revoked)


# --- servers ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int) -> bool:
    """Is something listening on 127.0.0.1:port? Read from /proc (no probe connection)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):  # openssl listens on [::]
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                parts = line.split()
                if parts[1].endswith(suffix) and parts[3] == "0A":
                    return True
    return False


@contextmanager
def process(argv: list[str], env: dict[str, str], port: int, log: Path, *,
            new_session: bool = True) -> Iterator[int]:
    """Run a server in its own process group until the block ends, then kill the group.

    ``openssl ocsp -multi`` makes its own process group (``setpgid(0, 0)``, which fails, and
    makes it exit 1 silently, if it already leads a session): it must not get a new session.
    """
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=new_session, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not listening(port):
            if proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited ({proc.returncode}):\n{_tail(log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not listen on {port}:\n{_tail(log)}")
            time.sleep(0.05)
        time.sleep(0.3)  # every worker up
        yield proc.pid  # = its process group
    finally:
        with _suppress():
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def _tail(log: Path, lines: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _suppress() -> contextlib.suppress:
    return contextlib.suppress(ProcessLookupError)


def openssl_argv(s: Setup, port: int) -> list[str]:
    return ["openssl", "ocsp", "-index", str(s.index), "-port", str(port), "-rsigner",
            str(s.responder_pem), "-rkey", str(s.responder_key), "-passin",
            "env:FLEETTRUST_KEYSTORE_PASSPHRASE", "-CA", str(s.ca_pem), "-multi", "2",
            "-nmin", "60"]


def uvicorn_argv(spec: str, port: int, *, factory: bool, app_dir: Path | None = None) -> list[str]:
    argv = [PYTHON, "-m", "uvicorn", spec, "--host", "127.0.0.1", "--port", str(port),
            "--workers", "2", "--no-access-log", "--no-proxy-headers", "--log-level", "warning",
            "--http", HTTP_PROTOCOL[0]]
    if factory:
        argv.append("--factory")
    if app_dir is not None:
        argv += ["--app-dir", str(app_dir)]
    return argv


def check_answer(url: str, s: Setup) -> str:
    """POST the benchmark request once; the answer must be a good response for our device."""
    req = urllib.request.Request(  # noqa: S310 (a loopback http URL built here)
        url, data=s.request.read_bytes(), method="POST",
        headers={"Content-Type": "application/ocsp-request", "Connection": "close"})
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
        ctype = r.headers.get("content-type")
        body = r.read()
    resp = cocsp.load_der_ocsp_response(body)
    if resp.response_status is not cocsp.OCSPResponseStatus.SUCCESSFUL:
        raise AssertionError(f"{url}: {resp.response_status}")
    if resp.certificate_status is not cocsp.OCSPCertStatus.GOOD \
            or resp.serial_number != s.good.serial_number:
        raise AssertionError(f"{url}: wrong answer {resp.certificate_status}")
    return f"{ctype}, {len(body)} bytes, good"


# --- the client ---------------------------------------------------------------------------------


_TICK = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    """CPU time (user + system) used so far by the live processes of process group ``pgid``."""
    total = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / _TICK


@dataclass
class Result:
    name: str
    rate: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests: int
    errors: int
    check: str
    cpu_us: float = 0.0  # server CPU time per response (all its processes)


def run_wrk(name: str, url: str, s: Setup, script: Path, *, duration: float, connections: int,
            threads: int, check: str, pgid: int) -> Result:
    cpu0 = group_cpu_seconds(pgid)
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", "--timeout", "5s",
            "-s", str(script), url]
    out = subprocess.run(argv, env={**os.environ, **s.env}, capture_output=True, text=True,
                         timeout=duration + 60)
    match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed for {name}: {out.stdout}\n{out.stderr}")
    cpu = group_cpu_seconds(pgid) - cpu0
    data = json.loads(match.group(1))
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    return Result(name=name, rate=data["requests"] / (data["duration_us"] / 1e6),
                  p50_ms=data["p50_us"] / 1000, p90_ms=data["p90_us"] / 1000,
                  p99_ms=data["p99_us"] / 1000, max_ms=data["max_us"] / 1000,
                  requests=data["requests"], errors=errors, check=check,
                  cpu_us=cpu / max(data["requests"], 1) * 1e6)


def check_openssl(s: Setup, log: Path) -> str:
    """Check openssl's answer with a responder of its own: a checked-and-closed connection
    could leave a child spinning, which would slow a timed run."""
    port = free_port()
    with process(openssl_argv(s, port), {}, port, log, new_session=False):
        return check_answer(f"http://127.0.0.1:{port}/", s)


def measure_openssl(s: Setup, script: Path, args: argparse.Namespace, log: Path,
                    check: str) -> Result:
    """One timed run against a fresh ``openssl ocsp -multi 2`` (killed afterwards)."""
    port = free_port()
    with process(openssl_argv(s, port), {}, port, log, new_session=False) as pgid:
        return run_wrk("openssl ocsp -multi 2", f"http://127.0.0.1:{port}/", s, script,
                       duration=args.duration, connections=args.connections,
                       threads=args.threads, check=check, pgid=pgid)


@dataclass
class Running:
    """A uvicorn server started once for the whole benchmark, checked and warmed up."""

    name: str
    url: str
    pgid: int
    check: str

    def measure(self, s: Setup, script: Path, args: argparse.Namespace) -> Result:
        return run_wrk(self.name, self.url, s, script, duration=args.duration,
                       connections=args.connections, threads=args.threads, check=self.check,
                       pgid=self.pgid)


def start_uvicorn(stack: contextlib.ExitStack, name: str, argv: list[str], port: int, s: Setup,
                  script: Path, args: argparse.Namespace, log: Path) -> Running:
    url = f"http://127.0.0.1:{port}/ocsp"
    pgid = stack.enter_context(process(argv, s.env, port, log))
    check = check_answer(url, s)
    run_wrk(name, url, s, script, duration=args.warmup, connections=args.connections,
            threads=args.threads, check=check, pgid=pgid)  # warm-up: every worker's cache fills
    return Running(name, url, pgid, check)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--pg-url", default=os.environ.get("FLEETTRUST_TEST_PG_URL", DEFAULT_PG_URL))
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per timed run")
    ap.add_argument("--rounds", type=int, default=7,
                    help="interleaved rounds (a, b, c, d, a, b, ...); medians are reported")
    ap.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up (uvicorn)")
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2, help="wrk threads")
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--revoked", type=int, default=100)
    ap.add_argument("--skip-operator-app", action="store_true")
    ap.add_argument("--stock-http", action="store_true",
                    help="uvicorn's own httptools protocol for every uvicorn server")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)
    if args.stock_http:
        HTTP_PROTOCOL[0] = "httptools"
    for tool in ("wrk", "openssl"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian: apt-get install -y {tool})", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="ft-ocsp-bench-") as tmp_s:
        tmp = Path(tmp_s)
        log = tmp / "servers.log"
        log.touch()
        with database(args.db, tmp, args.pg_url) as url:
            t0 = time.perf_counter()
            s = setup_pki(tmp, url, args.devices, args.revoked)
            print(f"setup: {s.devices} devices ({s.revoked} revoked) in "
                  f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs; db={args.db}; "
                  f"load average {os.getloadavg()[0]:.1f}")
            script = tmp / "ocsp.lua"
            script.write_text(WRK_SCRIPT)
            (tmp / "plain_app.py").write_text(textwrap.dedent(PLAIN_APP))
            (tmp / "operator_app.py").write_text(textwrap.dedent(OPERATOR_APP))
            uvicorn_servers = [
                ("plain ASGI, uvicorn 2 workers", "plain_app:app", False, tmp),
                ("fleettrust OCSP app, uvicorn 2 workers",
                 "fleettrust.api.ocsp_routes:build_ocsp_app_from_env", True, None),
            ]
            if not args.skip_operator_app:
                uvicorn_servers += [
                    ("operator app + router, 2 workers", "operator_app:build", True, tmp),
                    ("OcspFastPath(operator app + router)", "operator_app:build_fast", True,
                     tmp),
                ]
            names = ["openssl ocsp -multi 2"] + [u[0] for u in uvicorn_servers]
            rounds: list[list[Result]] = []
            with contextlib.ExitStack() as stack:
                openssl_check = check_openssl(s, log)
                running = []
                for name, spec, factory, app_dir in uvicorn_servers:
                    port = free_port()
                    running.append(start_uvicorn(
                        stack, name, uvicorn_argv(spec, port, factory=factory, app_dir=app_dir),
                        port, s, script, args, log))
                for n in range(args.rounds):
                    row = [measure_openssl(s, script, args, log, openssl_check)]
                    row += [r.measure(s, script, args) for r in running]
                    rounds.append(row)
                    print(f"round {n + 1}: " + ", ".join(f"{r.rate:.0f}/s" for r in row)
                          + f" (load {os.getloadavg()[0]:.1f})", flush=True)

    print(f"\n{args.connections} kept-alive connections, wrk -t{args.threads}, "
          f"{args.duration:g} s per run, median of {args.rounds} interleaved rounds\n")
    print(f"{'server':46} {'resp/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU us/resp':>11} "
          f"{'errors':>6}")
    summary = []
    for i, name in enumerate(names):
        runs = [row[i] for row in rounds]
        med = {"name": name, "rate": _median([r.rate for r in runs]),
               "p50_ms": _median([r.p50_ms for r in runs]),
               "p99_ms": _median([r.p99_ms for r in runs]),
               "cpu_us": _median([r.cpu_us for r in runs]),
               "errors": sum(r.errors for r in runs), "check": runs[0].check,
               "runs": [asdict(r) for r in runs]}
        summary.append(med)
        print(f"{name:46} {med['rate']:9.0f} {med['p50_ms']:7.2f} {med['p99_ms']:7.2f} "
              f"{med['cpu_us']:11.1f} {med['errors']:6d}")
    vs_openssl = _median([row[2].rate / row[0].rate for row in rounds])
    vs_plain = _median([row[2].rate / row[1].rate for row in rounds])
    p99 = float(summary[2]["p99_ms"])  # type: ignore[arg-type]
    print(f"\nfleettrust / openssl: {vs_openssl:.2f}x (goal >= 2.5x) "
          f"{'ok' if vs_openssl >= 2.5 else 'MISSED'}")
    print(f"fleettrust / plain:   {vs_plain:.2f}x (goal >= 0.85x) "
          f"{'ok' if vs_plain >= 0.85 else 'MISSED'}")
    print(f"fleettrust p99:       {p99:.2f} ms (goal <= 2 ms) {'ok' if p99 <= 2.0 else 'MISSED'}")
    cpu_vs_openssl = _median([row[0].cpu_us / row[2].cpu_us for row in rounds if row[2].cpu_us])
    cpu_vs_plain = _median([row[1].cpu_us / row[2].cpu_us for row in rounds if row[2].cpu_us])
    print("(ratios: median of the per-round ratios)")
    print(f"server CPU per response, fleettrust vs openssl: {cpu_vs_openssl:.2f}x less; "
          f"vs plain: {cpu_vs_plain:.2f}x (1.0 = same cost; robust to other load on the host)")
    if any(m["errors"] for m in summary):
        print("errors during the runs; see the table", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({
            "cpus": os.cpu_count(), "db": args.db, "duration_s": args.duration,
            "rounds": args.rounds, "connections": args.connections,
            "wrk_threads": args.threads, "servers": summary,
            "ratio_vs_openssl": vs_openssl, "ratio_vs_plain": vs_plain,
            "cpu_efficiency_vs_openssl": cpu_vs_openssl, "cpu_efficiency_vs_plain": cpu_vs_plain,
        }, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
