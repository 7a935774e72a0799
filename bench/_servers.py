"""Launch helpers for the benchmarks: a cached bench fleet, the operator API and the device gateway
as separate processes (the gateway with N worker processes on one listening socket), and
``openssl s_server`` with the gateway's own credential. Loopback only.

* :func:`prepare_fleet` — a fleet (real offline-root ceremony, fleet CA, factory with its CA,
  one batch, a factory token) in ``<base>/<db>/`` with its database: a SQLite file there, or the
  PostgreSQL schema ``bench_gateway`` (dropped and re-made when the cache is rebuilt). The fleet
  is kept between runs (``fleet.json`` says what it is); ``fresh=True`` rebuilds it.
* :func:`serve_api` — ``fleettrust``'s operator API (uvicorn, one process) on a free port.
* :func:`serve_gateway` — the device gateway with N worker processes: ``launcher="serve"`` runs
  the real server, ``fleettrust serve --workers N --gateway-port P`` (operator API, gateway and
  background jobs in every worker; :func:`gateway_command` tells whether the CLI has it);
  ``launcher="fork"`` binds one listening socket here (``IPPROTO_TCP``, see below) and forks N
  processes that each build their own ``ServiceContext`` and
  ``fleettrust.api.gateway_server.build_gateway`` app and serve it with
  ``uvicorn.Server.serve(sockets=[...])`` on the inherited socket (gateway only).
* :func:`serve_canned` — a trivial mTLS server answering every check-in with a fixed answer:
  what the simulator alone can generate (its ceiling on this machine).
* :func:`serve_openssl` — ``openssl s_server -HTTP`` with the gateway's server certificate and
  key and the gateway's client-CA bundle, client certificates required (``-Verify 5``), no
  tickets, answering ``GET /healthz`` with the same 15-byte JSON as the gateway.

Every server is a child process started here and stopped by its pid (:class:`Proc`).

    python bench/_servers.py gateway --db sqlite --workers 2 --port 8443   # manual use
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BASE = Path(tempfile.gettempdir()) / "fleettrust-bench"
DEFAULT_PG_URL = os.environ.get("FLEETTRUST_BENCH_PG_URL",
                                "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_SCHEMA = "bench_gateway"
KEYSTORE_PASSPHRASE = "fleettrust-bench-keystore"
ROOT_PASSPHRASE = b"fleettrust bench root passphrase"
FLEET_VERSION = 2  # bump to invalidate cached fleets
BATCH_SIZE = 200_000


def bench_env() -> dict[str, str]:
    """Environment of every server process started here."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETTRUST_")}
    env["FLEETTRUST_KEYSTORE_PASSPHRASE"] = KEYSTORE_PASSPHRASE
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), str(REPO / "bench"),
                                         env.get("PYTHONPATH", "")])
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the cached fleet -----------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    db: str  # sqlite | postgresql
    base: Path
    database_url: str
    batch_id: str
    factory_token: str
    admin_token: str

    @property
    def data_dir(self) -> Path:
        return self.base / "data"

    @property
    def state_root(self) -> Path:
        """Where the simulated devices' state directories live: on tmpfs when there is one
        (each device state write is an atomic rename, ~1.2 ms on this ext4 vs 0.1 ms on tmpfs;
        the devices are disposable), else next to the fleet."""
        return device_root(self.base)

    def to_json(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["base"] = str(self.base)
        doc["version"] = FLEET_VERSION
        return doc


def device_root(fleet_dir: Path) -> Path:
    shm = Path("/dev") / "shm"
    if shm.is_dir() and os.access(shm, os.W_OK):
        return shm / "fleettrust-bench" / fleet_dir.name / "devices"
    return fleet_dir / "devices"


def _pg_url(schema: str) -> str:
    sep = "&" if "?" in DEFAULT_PG_URL else "?"
    return f"{DEFAULT_PG_URL}{sep}options=-csearch_path%3D{schema}"


def _settings(fleet_dir: Path, database_url: str) -> Any:
    from fleettrust.config import Settings

    return Settings(data_dir=fleet_dir / "data", database_url=database_url,
                    public_base_url="http://127.0.0.1:8080")


def _reset_pg_schema() -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(DEFAULT_PG_URL)
    with engine.begin() as c:
        c.execute(text(f'DROP SCHEMA IF EXISTS "{PG_SCHEMA}" CASCADE'))
        c.execute(text(f'CREATE SCHEMA "{PG_SCHEMA}"'))
    engine.dispose()


def _cached(fleet_dir: Path) -> Fleet | None:
    meta = fleet_dir / "fleet.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if doc.pop("version", None) != FLEET_VERSION:
        return None
    fleet = Fleet(**{**doc, "base": Path(doc["base"])})
    try:
        from sqlalchemy import select

        from fleettrust.storage.db import make_engine
        from fleettrust.storage.models import Batch

        engine = make_engine(fleet.database_url)
        with engine.connect() as c:
            found = c.execute(select(Batch.id).where(Batch.id == fleet.batch_id)).first()
        engine.dispose()
    except Exception:  # any trouble: rebuild
        return None
    return fleet if found else None


def prepare_fleet(db: str, *, base: Path = DEFAULT_BASE, fresh: bool = False) -> Fleet:
    """The bench fleet for ``db`` (``sqlite`` | ``postgresql``), reused when cached."""
    os.environ["FLEETTRUST_KEYSTORE_PASSPHRASE"] = KEYSTORE_PASSPHRASE
    fleet_dir = base / db
    if not fresh:
        cached = _cached(fleet_dir)
        if cached is not None:
            return cached
    from cryptography.hazmat.primitives import serialization

    from fleettrust import ceremony
    from fleettrust.services import hierarchy
    from fleettrust.services.auth import Principal, create_token
    from fleettrust.services.context import ServiceContext
    from fleettrust.storage.db import make_engine
    from fleettrust.storage.migrate import upgrade

    shutil.rmtree(fleet_dir, ignore_errors=True)
    shutil.rmtree(device_root(fleet_dir), ignore_errors=True)
    fleet_dir.mkdir(parents=True, mode=0o700)
    if db == "sqlite":
        database_url = f"sqlite:///{fleet_dir / 'fleettrust.db'}"
    elif db == "postgresql":
        _reset_pg_schema()
        database_url = _pg_url(PG_SCHEMA)
    else:
        raise ValueError(f"unknown database {db!r}")
    settings = _settings(fleet_dir, database_url)
    settings.data_dir.mkdir(parents=True, mode=0o700)
    engine = make_engine(database_url)
    upgrade(engine)
    engine.dispose()
    ctx = ServiceContext.create(settings)
    try:
        now = ctx.clock.now()
        with ctx.transaction() as s:
            row, admin_token = create_token(s, role="admin", subject="bench", now=now)
        admin = Principal(token_id=row.id, role="admin", subject="bench",
                          remote_addr="127.0.0.1")
        info = ceremony.init_root(fleet_dir / "offline-root", passphrase=ROOT_PASSPHRASE,
                                  now=now)
        csr = hierarchy.create_fleet_csr(ctx, admin, "Bench Fleet CA")
        cert = ceremony.sign_ca_csr(fleet_dir / "offline-root", csr.encode(),
                                    passphrase=ROOT_PASSPHRASE, now=now)
        hierarchy.import_fleet_certificate(
            ctx, admin, cert.public_bytes(serialization.Encoding.PEM).decode(),
            info.certificate.public_bytes(serialization.Encoding.PEM).decode())
        factory = hierarchy.create_factory(ctx, admin, name="Bench Line", batch_cas=True)
        batch = hierarchy.create_batch(
            ctx, admin, factory.factory.id, name="BENCH-GW", product_model="SIM-1",
            hardware_revision="r1", planned_size=BATCH_SIZE, manufactured_on=dt.date.today())
        with ctx.transaction() as s:
            _, factory_token = create_token(s, role="factory", subject="bench-station",
                                            now=now, factory_id=factory.factory.id)
    finally:
        ctx.close()
    fleet = Fleet(db=db, base=fleet_dir, database_url=database_url, batch_id=batch.batch.id,
                  factory_token=factory_token, admin_token=admin_token)
    (fleet_dir / "fleet.json").write_text(json.dumps(fleet.to_json(), indent=2))
    return fleet


def load_fleet(path: Path) -> Fleet:
    doc = json.loads(path.read_text())
    doc.pop("version", None)
    return Fleet(**{**doc, "base": Path(doc["base"])})


def registered_devices(fleet: Fleet) -> int:
    from sqlalchemy import func, select

    from fleettrust.storage.db import make_engine
    from fleettrust.storage.models import Device

    engine = make_engine(fleet.database_url)
    try:
        with engine.connect() as c:
            return int(c.scalar(select(func.count()).select_from(Device)) or 0)
    finally:
        engine.dispose()


# --- child processes ------------------------------------------------------------------------


@dataclass
class Proc:
    """A server child process started here; ``stop()`` ends it by its pid."""

    name: str
    popen: subprocess.Popen[str]
    port: int
    info: dict[str, Any] = dataclasses.field(default_factory=dict)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()



def _wait_ready(popen: subprocess.Popen[str], name: str, timeout: float = 120.0
                ) -> dict[str, Any]:
    """Read the child's stdout until its ``READY {json}`` line."""
    assert popen.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = popen.stdout.readline()
        if not line:
            break
        if line.startswith("READY "):
            info: dict[str, Any] = json.loads(line[6:])
            return info
    popen.kill()
    err = popen.stderr.read() if popen.stderr is not None else ""
    raise RuntimeError(f"{name} did not start (exit {popen.poll()}): {err[-3000:]}")


def _spawn(name: str, args: list[str], *, log: Path | None = None) -> Proc:
    stderr: Any = subprocess.PIPE
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        stderr = log.open("w")
    popen = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args], cwd=REPO,
                             env=bench_env(), stdout=subprocess.PIPE, stderr=stderr, text=True)
    if log is not None:
        stderr.close()
    info = _wait_ready(popen, name)
    return Proc(name, popen, int(info["port"]), info)


def serve_api(fleet: Fleet, *, log: Path | None = None) -> Proc:
    """The operator API (one uvicorn process) on a free loopback port."""
    meta = fleet.base / "fleet.json"
    return _spawn("operator API", ["api", "--fleet", str(meta)], log=log)


def gateway_command() -> list[str] | None:
    """``fleettrust serve`` arguments for a gateway with workers, if the CLI has them."""
    exe = Path(sys.executable).with_name("fleettrust")
    try:
        out = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True,
                             timeout=30, env=bench_env()).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [str(exe), "serve"] if "--gateway-port" in out else None


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _gateway_ready(fleet: Fleet, port: int, popen: subprocess.Popen[str], timeout: float
                   ) -> None:
    """Until ``GET /healthz`` over mTLS (first device's certificate) answers 200."""
    import ssl

    from fleettrust.agent.state import StateStore

    device = next(d for d in sorted(fleet.state_root.iterdir()) if (d / "state.json").exists())
    identity = StateStore(device, durable=False).load(verify_chain_to_root=False)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(identity.root_path))
    context.load_cert_chain(str(identity.certificate_path), str(identity.key_path))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise RuntimeError(f"fleettrust serve exited with {popen.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
                if tls.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except (OSError, ssl.SSLError):
            pass
        time.sleep(0.2)
    raise RuntimeError("the gateway of fleettrust serve did not answer in time")


def serve_fleettrust(fleet: Fleet, *, workers: int, log: Path | None = None) -> Proc:
    """``fleettrust serve --workers N --gateway-port P``: the real server (operator API,
    device gateway and every background job in each worker) on free loopback ports."""
    command = gateway_command()
    if command is None:
        raise RuntimeError("this fleettrust serve has no --gateway-port")
    _write_credential(fleet)
    api_port, gw_port = free_port(), free_port()
    log = log or fleet.base / f"fleettrust-serve-{workers}.log"
    with log.open("w") as err:
        popen = subprocess.Popen(
            [*command, "--data-dir", str(fleet.data_dir), "--database-url", fleet.database_url,
             "--port", str(api_port), "--gateway-port", str(gw_port), "--workers", str(workers)],
            cwd=fleet.base, env=bench_env(), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        _gateway_ready(fleet, gw_port, popen, timeout=120)
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    pids = _children(popen.pid) if workers > 1 else [popen.pid]
    return Proc(f"fleettrust serve x{workers}", popen, gw_port,
                {"port": gw_port, "url": f"https://127.0.0.1:{gw_port}", "workers": pids,
                 "api_port": api_port, "launcher": "fleettrust serve"})


def _write_credential(fleet: Fleet) -> None:
    """Issue (or reuse) the gateway's TLS credential and note its files for s_server."""
    from fleettrust.services.gateway import ensure_gateway_credential

    os.environ["FLEETTRUST_KEYSTORE_PASSPHRASE"] = KEYSTORE_PASSPHRASE
    ctx = _ctx(fleet)
    try:
        settings = ctx.settings
        cred = ensure_gateway_credential(ctx, dns_names=list(settings.gateway_dns_names),
                                         ip_addresses=list(settings.gateway_ips))
    finally:
        ctx.close()
    (fleet.data_dir / "gateway" / "bench-credential.json").write_text(
        json.dumps(dataclasses.asdict(cred)))


def serve_gateway(fleet: Fleet, *, workers: int, port: int | None = None,
                  log: Path | None = None, launcher: str = "fork") -> Proc:
    """The device gateway with ``workers`` processes on one listening socket: this module's
    fork launcher (gateway only), or ``launcher="serve"``: ``fleettrust serve``."""
    if launcher == "serve":
        return serve_fleettrust(fleet, workers=workers, log=log)
    meta = fleet.base / "fleet.json"
    args = ["gateway", "--fleet", str(meta), "--workers", str(workers),
            "--port", str(port or 0)]
    return _spawn(f"gateway x{workers}", args, log=log)


def serve_openssl(fleet: Fleet, *, port: int | None = None, tickets: bool = False) -> Proc:
    """``openssl s_server -HTTP`` (``GET /healthz`` answered from a file) with the gateway's
    own certificate, key and client-CA bundle, requiring a client certificate (``-Verify 5``:
    chain depth up to 5). Start the gateway once before (it writes the credential files)."""
    gw_dir = fleet.data_dir / "gateway"
    cred = json.loads((gw_dir / "bench-credential.json").read_text())
    port = port or free_port()
    args = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}",
            "-cert", cred["cert_chain_path"], "-key", cred["key_path"],
            "-pass", "env:FLEETTRUST_KEYSTORE_PASSPHRASE",
            "-CAfile", cred["client_ca_path"], "-Verify", "5", "-HTTP", "-quiet"]
    if not tickets:
        args.append("-no_ticket")
    # s_server prints its verify callback for every connection even with -quiet, and an
    # error line for some: never let it block on a full pipe
    # -HTTP serves ./healthz (status line and headers included): the same tiny answer as the
    # gateway's GET /healthz
    www = fleet.base / "s_server-www"
    www.mkdir(exist_ok=True)
    (www / "healthz").write_bytes(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n"
                                  b"content-length: 15\r\n\r\n{\"status\":\"ok\"}")
    log = fleet.base / "openssl-s_server.log"
    with log.open("w") as err_file:
        popen = subprocess.Popen(args, env=bench_env(), stdin=subprocess.DEVNULL, cwd=www,
                                 stdout=subprocess.DEVNULL, stderr=err_file, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return Proc("openssl s_server", popen, port)
        if popen.poll() is not None:
            raise RuntimeError(f"openssl s_server failed: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    popen.kill()
    raise RuntimeError("openssl s_server did not start")


def serve_canned(fleet: Fleet) -> Proc:
    """A trivial asyncio mTLS server (the gateway's credential, client certificates verified)
    answering every request with a fixed check-in answer: the simulator's own ceiling."""
    meta = fleet.base / "fleet.json"
    return _spawn("canned check-in server", ["canned", "--fleet", str(meta)])


@contextlib.contextmanager
def running(*procs: Proc) -> Iterator[tuple[Proc, ...]]:
    try:
        yield procs
    finally:
        for proc in procs:
            proc.stop()


# --- what the child processes run -----------------------------------------------------------


def _ctx(fleet: Fleet) -> Any:
    from fleettrust.services.context import ServiceContext

    return ServiceContext.create(_settings(fleet.base, fleet.database_url))


def _ready(**info: Any) -> None:
    sys.stdout.write("READY " + json.dumps(info) + "\n")
    sys.stdout.flush()


def _run_api(fleet: Fleet) -> None:
    import uvicorn

    from fleettrust.api.app import create_app

    port = free_port()
    config = uvicorn.Config(create_app(_ctx(fleet)), host="127.0.0.1", port=port,
                            log_level="warning", proxy_headers=False)
    server = uvicorn.Server(config)

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.02)
        _ready(port=port, url=f"http://127.0.0.1:{port}")
        await task

    asyncio.run(main())


def _run_gateway(fleet: Fleet, workers: int, port: int) -> None:
    _write_credential(fleet)
    cred = json.loads((fleet.data_dir / "gateway" / "bench-credential.json").read_text())
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets whose ``proto`` says
    # TCP, and accepted sockets inherit the listening socket's; with the default proto 0 every
    # response split into headers + body waits ~40 ms for the client's delayed ACK (Nagle).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(4096)
    sock.set_inheritable(True)
    bound = int(sock.getsockname()[1])
    children: list[int] = []
    ready_r, ready_w = os.pipe()
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            code = 0
            try:
                _gateway_worker(fleet, sock, bound, ready_w)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                os._exit(code)
        children.append(pid)
    os.close(ready_w)
    sock.close()
    started = 0
    while started < workers:
        chunk = os.read(ready_r, 64)
        if not chunk:
            break
        started += chunk.count(b"r")
    if started < workers:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        raise SystemExit(f"only {started} of {workers} gateway workers started")

    def forward(signum: int, _frame: Any) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    _ready(port=bound, url=f"https://127.0.0.1:{bound}", workers=children, credential=cred,
           launcher="bench/_servers.py fork")
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except ChildProcessError:
                break
            except InterruptedError:
                continue


def _gateway_worker(fleet: Fleet, sock: socket.socket, port: int, ready_fd: int) -> None:
    from fleettrust.api.gateway_server import build_gateway

    ctx = _ctx(fleet)
    gateway = build_gateway(ctx, host="127.0.0.1", port=port)
    server = gateway.server

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            if task.done():
                await task
                return
            await asyncio.sleep(0.02)
        os.write(ready_fd, b"r")
        os.close(ready_fd)
        await task

    asyncio.run(main())


def _run_canned(fleet: Fleet) -> None:
    import ssl

    cred = json.loads((fleet.data_dir / "gateway" / "bench-credential.json").read_text())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cred["cert_chain_path"], cred["key_path"],
                            password=KEYSTORE_PASSPHRASE.encode())
    context.load_verify_locations(cred["client_ca_path"])
    context.verify_mode = ssl.CERT_REQUIRED
    body = json.dumps({"device_id": "d-canned", "status": "active",
                       "server_time": "2026-01-01T00:00:00Z", "next_checkin_s": 300,
                       "renew": False, "actions": []}).encode()
    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)

    class Canned(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buffer = b""

        def data_received(self, data: bytes) -> None:
            self.buffer += data
            while True:
                end = self.buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                length = 0
                for line in self.buffer[:end].split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(self.buffer) < end + 4 + length:
                    return
                self.buffer = self.buffer[end + 4 + length:]
                self.transport.write(answer)

    async def main() -> None:
        port = free_port()
        server = await asyncio.get_running_loop().create_server(
            Canned, "127.0.0.1", port, ssl=context)
        _ready(port=port, url=f"https://127.0.0.1:{port}")
        await server.serve_forever()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    api = sub.add_parser("api", help="operator API of a prepared fleet")
    api.add_argument("--fleet", type=Path, help="fleet.json of a prepared fleet")
    gw = sub.add_parser("gateway", help="device gateway of a prepared fleet")
    gw.add_argument("--fleet", type=Path)
    gw.add_argument("--workers", type=int, default=2)
    gw.add_argument("--port", type=int, default=0)
    canned = sub.add_parser("canned", help="fixed-answer mTLS server (simulator ceiling)")
    canned.add_argument("--fleet", type=Path)
    for p in (api, gw, canned):
        p.add_argument("--db", choices=("sqlite", "postgresql"), default="sqlite",
                       help="prepare (or reuse) this fleet when --fleet is not given")
    args = parser.parse_args(argv)
    os.environ["FLEETTRUST_KEYSTORE_PASSPHRASE"] = KEYSTORE_PASSPHRASE
    fleet = load_fleet(args.fleet) if args.fleet else prepare_fleet(args.db)
    if args.what == "api":
        _run_api(fleet)
    elif args.what == "canned":
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        _run_canned(fleet)
    else:
        _run_gateway(fleet, args.workers, args.port)


if __name__ == "__main__":
    main()
