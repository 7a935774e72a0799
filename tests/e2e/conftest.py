"""The real device agent against the real device gateway and operator API, all on loopback.

:class:`Stack` runs the operator API (``LiveServer``) and the device gateway
(``RunningGateway``, mutual TLS) in this process, on the test's database (SQLite file or
PostgreSQL schema), with a fleet made by the real ceremony, a factory, a batch and a factory
token. The agent runs as a real subprocess (``python -m tests.e2e.agent_main``: the
``fleettrust agent`` CLI) so that it can be SIGKILLed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fleettrust.services import hierarchy
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from tests.api.gateway_fixtures import RunningGateway
from tests.conftest import Hierarchy, LiveServer, make_token

REPO = Path(__file__).resolve().parents[2]
AGENT_TIMEOUT_S = 60.0
_serials = itertools.count(1)


@dataclass
class Stack:
    ctx: ServiceContext
    admin: Principal
    api: LiveServer
    gateway: RunningGateway
    factory_token: str
    batch_id: str
    tmp: Path
    _zygote: Zygote | None = None

    def manifest_file(self, name: str) -> Path:
        """A manifest override file with hardware ids unique in this test."""
        n = next(_serials)
        path = self.tmp / f"manifest-{name}-{n}.json"
        path.write_text(json.dumps({
            "cpu_serial": f"E2E{os.getpid():06d}{n:08d}",
            "mac_addresses": [f"02:e2:e0:{(n >> 16) & 255:02x}:{(n >> 8) & 255:02x}:"
                              f"{n & 255:02x}"],
        }))
        return path

    def agent_cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.e2e.agent_main", *args]

    def enroll_args(self, state_dir: Path, name: str = "dev") -> list[str]:
        return ["enroll", "--state-dir", str(state_dir),
                "--manifest-file", str(self.manifest_file(name)),
                "--gateway", self.gateway.url, "--server", self.api.url,
                "--token", self.factory_token, "--batch", self.batch_id,
                "--station", "e2e-station"]

    def run_args(self, state_dir: Path, *extra: str) -> list[str]:
        return ["run", "--state-dir", str(state_dir), "--once", "--timeout", "10", *extra]

    def agent(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.agent_cmd(*args), cwd=REPO, env=agent_env(),
                              capture_output=True, text=True, timeout=AGENT_TIMEOUT_S)
        if check and proc.returncode != 0:
            raise AssertionError(f"agent {args[0]} exited {proc.returncode}\n"
                                 f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
        return proc

    def zygote(self) -> Zygote:
        if self._zygote is None:
            self._zygote = Zygote(self.agent_cmd("--zygote"))
        return self._zygote

    def close(self) -> None:
        if self._zygote is not None:
            self._zygote.close()
            self._zygote = None

    def set_validity(self, days: int) -> None:
        """Validity of certificates issued from now on (enrollment and renewal alike)."""
        self.ctx.settings = dataclasses.replace(self.ctx.settings, device_validity_days=days)


class Zygote:
    """``tests.e2e.agent_main --zygote``: forks pre-imported agent processes on request."""

    def __init__(self, cmd: list[str]) -> None:
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=agent_env(), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.pending = False

    def start(self, args: list[str], out: Path, err: Path) -> int:
        """Fork an agent running ``args``; its stdout/stderr go to ``out``/``err``."""
        assert not self.pending, "one agent at a time"
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"args": args, "out": str(out), "err": str(err)}) + "\n")
        self.proc.stdin.flush()
        self.pending = True
        return int(self.proc.stdout.readline())

    def wait(self, timeout: float | None) -> int | None:
        """The raw wait status of the running agent, or None if it is still running."""
        assert self.pending
        assert self.proc.stdout is not None
        if timeout is not None:
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                return None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the agent zygote died")
        self.pending = False
        return int(line)

    def close(self) -> None:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc.stdout.close()


def agent_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FLEETTRUST_", "SSL_", "HTTP_", "HTTPS_", "http_", "https_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.fixture
def stack(ctx: ServiceContext, admin: Principal, fleet: Hierarchy,
          factory: hierarchy.FactoryCreated, factory_principal: Principal,
          tmp_path: Path) -> Iterator[Stack]:
    batch = hierarchy.create_batch(
        ctx, factory_principal, factory.factory.id, name="E2E-2026", product_model="TH-100",
        hardware_revision="r2", planned_size=10_000, manufactured_on=dt.date(2026, 11, 20))
    token = make_token(ctx, "factory", "e2e-station", factory.factory.id)
    original = ctx.settings
    with LiveServer(ctx) as api, RunningGateway(ctx) as gateway:
        stack = Stack(ctx=ctx, admin=admin, api=api, gateway=gateway, factory_token=token,
                      batch_id=batch.batch.id, tmp=tmp_path)
        try:
            yield stack
        finally:
            stack.close()
    ctx.settings = original


def read_state(state_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((state_dir / "state.json").read_text())
    return doc
