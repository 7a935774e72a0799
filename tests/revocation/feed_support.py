"""Helpers for the revocation feed tests: issue many devices, run an app under uvicorn."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from fleettrust.api.app import create_app
from fleettrust.services import issuance
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from tests.conftest import LiveServer, device_csr, free_port, manifest


def issue_many(ctx: ServiceContext, principal: Principal, batch_id: str,
               n: int) -> list[issuance.IssuedDevice]:
    reqs = [issuance.IssueRequest(csr=device_csr()[0], manifest=manifest()) for _ in range(n)]
    return issuance.issue_devices(ctx, principal, batch_id, reqs).devices


def operator_app(ctx: ServiceContext) -> FastAPI:
    """The operator app; it already serves the feed (``feed_routes.operator_router``)."""
    return create_app(ctx)


class AppServer(LiveServer):
    """An ASGI app under uvicorn in a thread on a free loopback port (plain HTTP)."""

    def __init__(self, app: Any) -> None:
        super().__init__(app=app)


def wait_until(predicate: Any, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Mosquitto:
    """A real Mosquitto broker on a free port, started from a config file (not the system one)."""

    def __init__(self, conf: Path, port: int) -> None:
        self.conf = conf
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = conf.with_suffix(".log")

    @classmethod
    def plain(cls, tmp: Path) -> Mosquitto:
        port = free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        conf = tmp / "plain.conf"
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\nlog_dest stderr\n")
        return cls(conf, port)

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def start(self) -> None:
        fh = self.log.open("ab")
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=fh, stderr=fh)
        fh.close()
        deadline = time.time() + 10
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()
