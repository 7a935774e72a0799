"""The device gateway refuses revoked and held devices and closes their open connections —
in its own process and when the revocation is made by another OS process on the same database."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fleettrust.services import hierarchy
from fleettrust.services import revocation as rev
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from tests.api.gateway_fixtures import DeviceFiles, RunningGateway, enroll, tls_client
from tests.revocation.revocation_support import AppServer, crl_app


def _status(device: DeviceFiles, url: str) -> tuple[int, str]:
    with httpx.Client(base_url=url, timeout=10,
                      verify=tls_client(device.root_path, device.cert_path,
                                        device.key_path)) as c:
        r = c.post("/v1/device/checkin", json=device.checkin_body())
    return r.status_code, (r.json().get("code", "") if r.status_code != 200 else "ok")


def _stream(device: DeviceFiles, url: str) -> tuple[threading.Event, threading.Event]:
    """Open the device's event stream in a thread; (hello seen, stream ended)."""
    hello, ended = threading.Event(), threading.Event()

    def run() -> None:
        try:
            with httpx.Client(base_url=url, timeout=30,
                              verify=tls_client(device.root_path, device.cert_path,
                                                device.key_path)) as c, \
                    c.stream("GET", "/v1/device/events") as r:
                for line in r.iter_lines():
                    if "hello" in line:
                        hello.set()
        except httpx.HTTPError:
            pass
        finally:
            ended.set()

    threading.Thread(target=run, daemon=True).start()
    assert hello.wait(10), "no hello on the event stream"
    return hello, ended


def _own_batch(ctx: ServiceContext, admin: Principal, factory_id: str) -> str:
    return hierarchy.create_batch(ctx, admin, factory_id, name="own", product_model="M",
                                  hardware_revision="r", planned_size=10,
                                  manufactured_on=dt.date(2026, 11, 20), own_ca=True).batch.id


def test_gateway_refuses_and_disconnects(
    ctx: ServiceContext, admin: Principal, factory: hierarchy.FactoryCreated,
    batch: hierarchy.BatchCreated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    dev = enroll(ctx, admin, batch.batch.id, tmp_path / "a", "a")
    held = enroll(ctx, admin, batch.batch.id, tmp_path / "h", "h")
    own = _own_batch(ctx, admin, factory.factory.id)
    in_own = enroll(ctx, admin, own, tmp_path / "o", "o")
    with RunningGateway(ctx) as gw:
        assert _status(dev, gw.url) == (200, "ok")
        # Revoke one device: its open event stream is closed, its next request refused.
        _, ended = _stream(dev, gw.url)
        t0 = time.monotonic()
        rev.revoke_device(ctx, admin, dev.device_id, "keyCompromise")
        assert ended.wait(5), "event stream of a revoked device stayed open"
        assert time.monotonic() - t0 < 1.5
        assert _status(dev, gw.url) == (403, "certificate_revoked")

        # Hold and release.
        rev.suspend_device(ctx, admin, held.device_id)
        _wait_for(lambda: _status(held, gw.url) == (403, "certificate_on_hold"))
        rev.release_device(ctx, admin, held.device_id)
        _wait_for(lambda: _status(held, gw.url) == (200, "ok"))

        # A large batch revocation is enforced from its decision (the rule), before any
        # per-certificate row exists.
        monkeypatch.setattr(rev, "INLINE_LIMIT", 0)
        monkeypatch.setattr(rev._kicker, "kick", lambda ctx: None)
        _, ended = _stream(in_own, gw.url)
        r = rev.revoke_batch(ctx, admin, own, "keyCompromise")
        assert r.first_seq is None  # rows not written yet
        assert ended.wait(5), "event stream of a device of a revoked batch stayed open"
        code = _status(in_own, gw.url)
        # The TLS layer may already refuse (a revoked CA is not loaded again), else the index.
        assert code == (403, "certificate_revoked")
        rev.materialize_pending(ctx)


def _wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


_GATEWAY_PROCESS = """
import asyncio, json, sys
from pathlib import Path
from fleettrust.config import Settings
from fleettrust.services.context import ServiceContext
from fleettrust.api.gateway_server import build_gateway
cfg = json.loads(sys.argv[1])
settings = Settings(data_dir=Path(cfg["data_dir"]), database_url=cfg["database_url"],
                    public_base_url=cfg["base_url"])
ctx = ServiceContext.create(settings)
gw = build_gateway(ctx, port=0)
async def main():
    task = asyncio.create_task(gw.server.serve())
    while not gw.server.started:
        await asyncio.sleep(0.02)
    print(gw.server.bound_ports()[0], flush=True)
    await task
asyncio.run(main())
"""


def test_revocation_in_process_a_is_enforced_by_process_b(
    ctx: ServiceContext, admin: Principal, factory: hierarchy.FactoryCreated,
    batch: hierarchy.BatchCreated, tmp_path: Path,
) -> None:
    """Process A (this one: a ServiceContext + the API) revokes; process B (a gateway in another
    OS process) refuses the device and closes its stream within one second."""
    # Enrol before process B starts so that its TLS store knows every CA.
    dev = enroll(ctx, admin, batch.batch.id, tmp_path / "a", "a")
    own = _own_batch(ctx, admin, factory.factory.id)
    in_own = enroll(ctx, admin, own, tmp_path / "o", "o")
    token = _token(ctx)
    proc_b = _start_gateway(ctx)
    try:
        url = proc_b[1]
        assert _status(dev, url) == (200, "ok")
        assert _status(in_own, url) == (200, "ok")
        with AppServer(crl_app(ctx)) as api:
            for device, path in [(dev, f"/v1/revocation/devices/{dev.device_id}"),
                                 (in_own, f"/v1/revocation/batches/{own}")]:
                _, ended = _stream(device, url)
                r = api.post(path, json={"reason": "keyCompromise"},
                             headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 200, r.text
                t0 = time.monotonic()
                assert ended.wait(3), "process B kept the stream open"
                while _status(device, url) != (403, "certificate_revoked"):
                    assert time.monotonic() - t0 < 1.0, "process B did not refuse within 1 s"
                    time.sleep(0.02)
                assert time.monotonic() - t0 < 1.0
    finally:
        _stop(proc_b[0])


def _token(ctx: ServiceContext) -> str:
    from tests.conftest import make_token

    return make_token(ctx, "admin", "ops")


def _start_gateway(ctx: ServiceContext) -> tuple[subprocess.Popen[str], str]:
    s = ctx.settings
    cfg = json.dumps({"data_dir": str(s.data_dir), "database_url": s.database_url,
                      "base_url": s.public_base_url})
    proc = subprocess.Popen([sys.executable, "-c", _GATEWAY_PROCESS, cfg],
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ))
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line:
        _stop(proc)
        raise AssertionError("gateway process did not start")
    return proc, f"https://127.0.0.1:{int(line)}"


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()
