"""Shared fixtures: a real database per test (SQLite file and PostgreSQL schema), a service
context, a hierarchy made through the real offline ceremony, factories, batches, device CSRs.

PostgreSQL is at 127.0.0.1:5432, database ``test`` (override with FLEETTRUST_TEST_PG_URL). When
it is unreachable the PostgreSQL half of the parametrised tests is skipped locally, but fails on
CI (``CI=true``) so a green CI always means both backends ran.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import create_engine, text

from fleettrust import ceremony
from fleettrust.config import Settings
from fleettrust.services import hierarchy
from fleettrust.services.auth import Principal, create_token
from fleettrust.services.context import ServiceContext
from fleettrust.storage.db import make_engine
from fleettrust.storage.migrate import upgrade

PG_URL = os.environ.get("FLEETTRUST_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
ROOT_PASSPHRASE = b"correct horse battery staple"
KEYSTORE_PASSPHRASE = "test-keystore-passphrase"

_pg_ok: bool | None = None


def pg_available() -> bool:
    global _pg_ok
    if _pg_ok is None:
        try:
            eng = create_engine(PG_URL, connect_args={"connect_timeout": 3})
            with eng.connect() as c:
                c.execute(text("select 1"))
            eng.dispose()
            _pg_ok = True
        except Exception:
            _pg_ok = False
    return _pg_ok


@pytest.fixture(autouse=True)
def _keystore_passphrase(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEETTRUST_KEYSTORE_PASSPHRASE", KEYSTORE_PASSPHRASE)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleettrust.db'}"
        return
    if not pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_URL} on CI")
        pytest.skip("PostgreSQL not reachable")
    schema = "t_" + secrets.token_hex(6)
    admin = create_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f'CREATE SCHEMA "{schema}"'))
    sep = "&" if "?" in PG_URL else "?"
    yield f"{PG_URL}{sep}options=-csearch_path%3D{schema}"
    with admin.begin() as c:
        c.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url,
                    public_base_url="http://127.0.0.1:8080")


@pytest.fixture
def ctx(settings: Settings) -> Iterator[ServiceContext]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    engine.dispose()
    c = ServiceContext.create(settings)
    yield c
    c.close()


def make_principal(ctx: ServiceContext, role: str, subject: str,
                   factory_id: str | None = None) -> Principal:
    with ctx.transaction() as s:
        row, _ = create_token(s, role=role, subject=subject, now=ctx.clock.now(),
                              factory_id=factory_id)
        return Principal(token_id=row.id, role=role, subject=subject, factory_id=factory_id,
                         remote_addr="127.0.0.1")


def make_token(ctx: ServiceContext, role: str, subject: str,
               factory_id: str | None = None) -> str:
    with ctx.transaction() as s:
        _, token = create_token(s, role=role, subject=subject, now=ctx.clock.now(),
                                factory_id=factory_id)
        return token


@pytest.fixture
def admin(ctx: ServiceContext) -> Principal:
    return make_principal(ctx, "admin", "alice")


@dataclass
class Hierarchy:
    root_dir: Path
    root_cert: x509.Certificate
    fleet_ca_id: str


def run_ceremony(ctx: ServiceContext, admin: Principal, root_dir: Path) -> Hierarchy:
    now = dt.datetime.now(dt.UTC)
    info = ceremony.init_root(root_dir, passphrase=ROOT_PASSPHRASE, now=now)
    csr = hierarchy.create_fleet_csr(ctx, admin, "Fleet CA")
    cert = ceremony.sign_ca_csr(root_dir, csr.encode(), passphrase=ROOT_PASSPHRASE, now=now)
    res = hierarchy.import_fleet_certificate(
        ctx, admin, cert.public_bytes(serialization.Encoding.PEM).decode(),
        info.certificate.public_bytes(serialization.Encoding.PEM).decode())
    return Hierarchy(root_dir, info.certificate, res["fleet_ca_id"])


@pytest.fixture
def fleet(ctx: ServiceContext, admin: Principal, tmp_path: Path) -> Hierarchy:
    return run_ceremony(ctx, admin, tmp_path / "offline-root")


@pytest.fixture
def factory(ctx: ServiceContext, admin: Principal, fleet: Hierarchy) -> hierarchy.FactoryCreated:
    return hierarchy.create_factory(ctx, admin, name="Shenzhen Line 1", batch_cas=True)


@pytest.fixture
def factory_principal(ctx: ServiceContext, factory: hierarchy.FactoryCreated) -> Principal:
    return make_principal(ctx, "factory", "station-1", factory.factory.id)


@pytest.fixture
def batch(ctx: ServiceContext, factory_principal: Principal,
          factory: hierarchy.FactoryCreated) -> hierarchy.BatchCreated:
    return hierarchy.create_batch(
        ctx, factory_principal, factory.factory.id, name="B-2026-11", product_model="TH-100",
        hardware_revision="r2", planned_size=50, manufactured_on=dt.date(2026, 11, 20))


_counter = iter(range(1, 10**9))


def device_csr(
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "device")]))
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def manifest(n: int | None = None) -> dict[str, Any]:
    n = n if n is not None else next(_counter)
    return {"cpu_serial": f"CPU{n:010d}",
            "mac_addresses": [f"02:00:00:{(n >> 16) & 255:02x}:{(n >> 8) & 255:02x}:{n & 255:02x}"],
            "wlan_module_id": f"WL-{n}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    """The real API app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, ctx: ServiceContext | None = None, *, app: Any = None) -> None:
        """Serve ``create_app(ctx)``, or any ASGI ``app`` given instead."""
        import uvicorn

        from fleettrust.api.app import create_app

        if app is None:
            assert ctx is not None, "LiveServer needs a context or an app"
            app = create_app(ctx)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.time() + 10
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.server.force_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(ctx: ServiceContext) -> Iterator[LiveServer]:
    with LiveServer(ctx) as srv:
        yield srv


def dump(obj: Any) -> str:
    return json.dumps(obj, default=str)
