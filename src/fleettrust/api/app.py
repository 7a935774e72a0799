"""The operator API application: ``create_app(ctx)`` wires routes, errors and limits.

OpenAPI is published at ``/openapi.json``. The device gateway (mutual TLS) is a separate
application on a separate listener; this one serves operators, factories, owners and the public
PKI endpoints (CA certificates, CRLs, OCSP), the revocation feed and the transparency log.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI

from fleettrust import __version__
from fleettrust.api import crl_routes
from fleettrust.api.device_admin_routes import router as device_admin_router
from fleettrust.api.feed_routes import operator_router as feed_operator_router
from fleettrust.api.ledger_routes import router as ledger_router
from fleettrust.api.ocsp_routes import OcspFastPath, ocsp_router
from fleettrust.api.problems import BodyLimitMiddleware, JsonBodyMiddleware, install_error_handlers
from fleettrust.api.revocation_routes import router as revocation_router
from fleettrust.api.routes import public, router
from fleettrust.services.context import ServiceContext


def create_app(ctx: ServiceContext) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The revocation index (followed every 100 ms) and the CRL publisher it drives; the
        # OCSP responder subscribes to the same index.
        tasks = await crl_routes.start_publisher(app, ctx)
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        responder = getattr(app.state, "ocsp_responder", None)
        if responder is not None:
            responder.close()

    app = FastAPI(
        lifespan=lifespan,
        title="fleettrust",
        version=__version__,
        description="Operator, factory and owner API of fleettrust.",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(router)
    app.include_router(device_admin_router)
    app.include_router(ledger_router)
    app.include_router(feed_operator_router)
    app.include_router(ocsp_router)
    app.include_router(crl_routes.public_router)
    app.include_router(crl_routes.admin_router)
    app.include_router(revocation_router)
    bulk_limit = ctx.settings.max_bulk_body_bytes

    def limit_for(path: str) -> int | None:
        """Bulk issuance and registration may carry many CSRs; everything else is small."""
        return bulk_limit if path.endswith(("/devices/bulk", "/devices/register")) else None

    # Added last = runs first: the size limit applies before anything reads the body.
    app.add_middleware(JsonBodyMiddleware, prefix="/v1/")
    app.add_middleware(
        BodyLimitMiddleware, default_limit=ctx.settings.max_body_bytes, limit_for=limit_for
    )
    # Outermost: answers repeated OCSP requests from the responder's cache before routing.
    app.add_middleware(OcspFastPath)
    return app
