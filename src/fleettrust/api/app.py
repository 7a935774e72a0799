"""The operator API application: ``create_app(ctx)`` wires routes, errors and limits.

OpenAPI is published at ``/openapi.json``. The device gateway (mutual TLS) is a separate
application on a separate listener; this one serves operators, factories, owners and the public
PKI endpoints (CA certificates; CRLs and OCSP arrive with the revocation work).
"""

from __future__ import annotations

from fastapi import FastAPI

from fleettrust import __version__
from fleettrust.api.problems import BodyLimitMiddleware, install_error_handlers
from fleettrust.api.routes import public, router
from fleettrust.services.context import ServiceContext


def create_app(ctx: ServiceContext) -> FastAPI:
    app = FastAPI(
        title="fleettrust",
        version=__version__,
        description="Operator, factory and owner API of fleettrust.",
    )
    app.state.ctx = ctx
    install_error_handlers(app)
    app.include_router(public)
    app.include_router(router)
    bulk_limit = ctx.settings.max_bulk_body_bytes

    def limit_for(path: str) -> int | None:
        return bulk_limit if path.endswith("/devices/bulk") or path.endswith(
            "/devices/register") else None

    app.add_middleware(BodyLimitMiddleware, default_limit=ctx.settings.max_body_bytes,
                       limit_for=limit_for)
    return app
