"""Background jobs every server process runs (registered with the runtime).

- ``ledger``: sequence new audit events into the transparency log and sign tree heads.
- ``housekeeping``: delete expired shared-secret sessions and nonces.
- ``mqtt``: push the revocation feed to an MQTT broker (only with ``FLEETTRUST_MQTT_URL``).

The revocation index, CRL publisher and OCSP responder run in the operator app's lifespan.

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


@background_job("mqtt")
async def mqtt_job(ctx: ServiceContext, shared: dict[str, Any]) -> None:
    """Push revocations to an MQTT broker when ``FLEETTRUST_MQTT_URL`` is set
    (``mqtt://[user:password@]host:port``); one leader publishes, the others stand by."""
    import os
    from urllib.parse import urlparse

    url = os.environ.get("FLEETTRUST_MQTT_URL")
    if not url:
        return
    parsed = urlparse(url)
    if parsed.scheme != "mqtt" or not parsed.hostname:
        log.error("FLEETTRUST_MQTT_URL must look like mqtt://host:port; MQTT push disabled")
        return
    from fleettrust.revocation.mqtt import BrokerSettings, start_publisher

    broker = BrokerSettings(host=parsed.hostname, port=parsed.port or 1883,
                            username=parsed.username, password=parsed.password,
                            client_id=f"fleettrust-{os.getpid()}")
    publisher = await asyncio.to_thread(start_publisher, ctx, broker)
    log.info("publishing revocations to %s:%s", broker.host, broker.port)
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.to_thread(publisher.stop)
