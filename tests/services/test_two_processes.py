"""Two server processes on one database issue into the same batch at the same time.

Each OS process (``multiprocessing`` with *spawn*, so nothing is inherited but arguments and
the environment) builds its own ServiceContext — its own engine, connection pool and key-store
handle — on the same SQLite file or PostgreSQL schema, authenticates with the same factory
token and bulk-issues into one batch that is smaller than the total both ask for. Afterwards:
every serial is unique, every returned device is stored, nothing is stored that was not
returned, and the batch holds exactly its planned size, never more.
"""

from __future__ import annotations

import datetime as dt
import multiprocessing as mp
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from fleettrust.services import hierarchy
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import AuditEvent, Batch, Certificate, Device
from tests.conftest import Hierarchy, device_csr, make_principal, make_token, manifest

PLANNED = 60
CHUNK = 6
PER_PROCESS = 8  # requests of CHUNK devices: 2 x 8 x 6 = 96 asked for, 60 fit


def _worker(data_dir: str, database_url: str, token: str, batch_id: str,
            requests: list[list[tuple[str, dict[str, Any]]]], start: Any,
            results: Any) -> None:
    """One "server process": its own context, then its bulk requests in lockstep with the
    other process (both send request i together, so the requests interleave)."""
    from fleettrust.config import Settings
    from fleettrust.errors import FleetTrustError
    from fleettrust.services import issuance
    from fleettrust.services.auth import authenticate
    from fleettrust.services.context import ServiceContext

    out: dict[str, Any] = {"issued": [], "errors": []}
    try:
        ctx = ServiceContext.create(Settings(data_dir=Path(data_dir), database_url=database_url))
        with ctx.transaction() as s:
            who = authenticate(s, token, ctx.clock.now(), "10.0.0.1")
        for chunk in requests:
            start.wait(timeout=60)
            try:
                res = issuance.issue_devices(ctx, who, batch_id, [
                    issuance.IssueRequest(csr=csr, manifest=m) for csr, m in chunk])
                out["issued"].extend((d.device_id, d.serial_hex) for d in res.devices)
            except FleetTrustError as exc:
                out["errors"].append(exc.code)
        ctx.close()
    except Exception as exc:  # report, so the parent can fail with the reason
        out["errors"].append(f"crash: {exc!r}")
    results.put(out)


def test_two_processes_issue_into_one_batch(ctx: ServiceContext, fleet: Hierarchy,
                                            factory: hierarchy.FactoryCreated) -> None:
    token = make_token(ctx, "factory", "two-procs", factory.factory.id)
    batch_id = hierarchy.create_batch(
        ctx, make_principal(ctx, "admin", "ops"), factory.factory.id, name="shared",
        product_model="M", hardware_revision="r1", planned_size=PLANNED,
        manufactured_on=dt.date(2026, 2, 3),
    ).batch.id
    work = [[[(device_csr()[0], manifest()) for _ in range(CHUNK)] for _ in range(PER_PROCESS)]
            for _ in range(2)]

    spawn = mp.get_context("spawn")
    start, results = spawn.Barrier(2), spawn.Queue()
    procs = [spawn.Process(target=_worker, args=(
        str(ctx.settings.data_dir), ctx.settings.database_url, token, batch_id, w, start,
        results)) for w in work]
    for p in procs:
        p.start()
    outs = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0

    for out in outs:
        assert all(not e.startswith("crash") for e in out["errors"]), out["errors"]
        assert set(out["errors"]) <= {"batch_full"}
    issued = [pair for out in outs for pair in out["issued"]]
    errors = [e for out in outs for e in out["errors"]]
    assert len(issued) == PLANNED  # the batch filled exactly...
    assert len(errors) == 2 * PER_PROCESS - PLANNED // CHUNK  # ...and the rest was refused
    assert all(out["issued"] for out in outs), "both processes should have issued something"
    serials = [s for _, s in issued]
    assert len(set(serials)) == len(serials)
    with ctx.transaction() as s:
        batch = s.get(Batch, batch_id)
        assert batch is not None
        assert batch.issued_count == PLANNED
        stored = dict(s.execute(select(Device.id, Certificate.serial_hex).join(
            Certificate, Certificate.device_id == Device.id).where(
                Device.batch_id == batch_id)).all())
        assert stored == dict(issued)  # no device lost, none stored that was not returned
        events = s.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "device.manufactured", AuditEvent.remote_addr == "10.0.0.1"))
        assert events == PLANNED
