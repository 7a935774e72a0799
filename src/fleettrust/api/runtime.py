"""The server runtime behind ``fleettrust serve``: both listeners and the background jobs.

One process runs the operator API (plain HTTP, default 127.0.0.1:8080), the device gateway
(mutual TLS, default 127.0.0.1:8443) and the background jobs every process needs (following
revocations and status changes, regenerating CRLs and OCSP responses, sequencing the
transparency log, housekeeping). The gateway starts as soon as a fleet CA exists (right away on
an initialised installation, or once the quickstart ceremony has imported it).

With ``workers > 1`` a supervisor binds both listening sockets once and starts that many worker
processes that share them; every job is written to be correct with several processes on one
database. Not here: what any job does (each lives in its own module).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from fleettrust.api.app import create_app
from fleettrust.api.tls import make_server
from fleettrust.config import Settings
from fleettrust.errors import FleetTrustError
from fleettrust.services.context import ServiceContext

log = logging.getLogger("fleettrust.runtime")
FLEET_CA_POLL_S = 1.0

#: Background jobs: each is called once per process with the context and returns a coroutine
#: that runs until cancelled. Modules register theirs with :func:`background_job`.
_JOBS: list[tuple[str, Callable[[ServiceContext, dict[str, Any]], Coroutine[Any, Any, None]]]] = []


def background_job(
    name: str,
) -> Callable[
    [Callable[[ServiceContext, dict[str, Any]], Coroutine[Any, Any, None]]],
    Callable[[ServiceContext, dict[str, Any]], Coroutine[Any, Any, None]],
]:
    def register(
        fn: Callable[[ServiceContext, dict[str, Any]], Coroutine[Any, Any, None]],
    ) -> Callable[[ServiceContext, dict[str, Any]], Coroutine[Any, Any, None]]:
        _JOBS.append((name, fn))
        return fn

    return register


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


async def _has_fleet_ca(ctx: ServiceContext) -> bool:
    from fleettrust.services.hierarchy import fleet_ca

    def check() -> bool:
        try:
            with ctx.sessions() as s:
                fleet_ca(s)
            return True
        except FleetTrustError:
            return False

    return await asyncio.to_thread(check)


async def serve_process(
    settings: Settings,
    *,
    api_socket: socket.socket | None = None,
    gateway_socket: socket.socket | None = None,
    announce: bool = True,
) -> None:
    """Run one server process until SIGINT/SIGTERM."""
    from fleettrust.api.gateway_server import build_gateway

    ctx = ServiceContext.create(settings)
    shared: dict[str, Any] = {}
    api = make_server(
        create_app(ctx),
        host=settings.host,
        port=settings.port,
        ssl_context=None,
        registry=None,
        log_level="warning",
    )
    api.handle_signals = False
    api.listen_sockets = [api_socket] if api_socket is not None else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateway_server: list[Any] = []

    async def run_gateway() -> None:
        while not await _has_fleet_ca(ctx):  # noqa: ASYNC110 - polls the database, not a local flag
            await asyncio.sleep(FLEET_CA_POLL_S)
        gw = await asyncio.to_thread(build_gateway, ctx)
        gw.server.handle_signals = False
        gw.server.listen_sockets = [gateway_socket] if gateway_socket is not None else None
        shared["gateway"] = gw
        gateway_server.append(gw.server)
        if announce:
            print(
                f"device gateway listening on https://{settings.gateway_host}:"
                f"{settings.gateway_port} (mutual TLS)",
                flush=True,
            )
        await gw.server.serve()

    tasks = [
        asyncio.create_task(api.serve(), name="api"),
        asyncio.create_task(run_gateway(), name="gateway"),
    ]
    jobs = [asyncio.create_task(fn(ctx, shared), name=name) for name, fn in _JOBS]
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is not stopper and t.exception() is not None:
                log.error("listener %s failed: %s", t.get_name(), t.exception())
    finally:
        api.should_exit = True
        for srv in gateway_server:
            srv.should_exit = True
        for j in jobs:
            j.cancel()
        stopper.cancel()
        if not gateway_server:
            tasks[1].cancel()
        await asyncio.gather(*tasks, *jobs, stopper, return_exceptions=True)
        ctx.close()


def _worker(settings: Settings, api_fd: int, gw_fd: int) -> None:
    api_sock = socket.socket(fileno=api_fd)
    gw_sock = socket.socket(fileno=gw_fd)
    asyncio.run(
        serve_process(settings, api_socket=api_sock, gateway_socket=gw_sock, announce=False)
    )


def run(settings: Settings, *, workers: int = 1) -> None:
    """Run the server in this process (``workers == 1``) or supervise worker processes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if workers == 1:
        asyncio.run(serve_process(settings))
        return
    api_sock = bind(settings.host, settings.port)
    gw_sock = bind(settings.gateway_host, settings.gateway_port)
    mp = multiprocessing.get_context("fork")
    procs = []
    for _ in range(workers):
        p = mp.Process(
            target=_worker,
            args=(settings, os.dup(api_sock.fileno()), os.dup(gw_sock.fileno())),
            daemon=False,
        )
        p.start()
        procs.append(p)
    print(
        f"{workers} workers; device gateway on https://{settings.gateway_host}:"
        f"{settings.gateway_port} once a fleet CA exists",
        flush=True,
    )

    def forward(sig: int, _frame: Any) -> None:
        for p in procs:
            if p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    for p in procs:
        p.join()
        code = code or (p.exitcode or 0)
    sys.exit(code)
