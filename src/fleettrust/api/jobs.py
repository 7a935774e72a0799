"""Background jobs every server process runs (registered with the runtime).

- ``ledger``: sequence new audit events into the transparency log and sign tree heads.
- ``housekeeping``: delete expired shared-secret sessions and nonces.

Each job is safe with several processes on one database (see the module each one calls).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fleettrust.api.runtime import background_job
from fleettrust.services.context import ServiceContext

log = logging.getLogger("fleettrust.jobs")


@background_job("ledger")
async def ledger_job(ctx: ServiceContext, shared: dict[str, Any]) -> None:
    from fleettrust.services.ledger import start_sequencer

    handle = await asyncio.to_thread(start_sequencer, ctx)
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.to_thread(handle.stop)


@background_job("housekeeping")
async def housekeeping_job(ctx: ServiceContext, shared: dict[str, Any]) -> None:
    from fleettrust.services import shared_secret

    while True:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(shared_secret.purge_expired, ctx)
        await asyncio.sleep(300)
