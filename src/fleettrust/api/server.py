"""Run the API with uvicorn (``fleettrust serve``). The device gateway joins here later as its
own listener with its own TLS trust rules."""

from __future__ import annotations

import uvicorn

from fleettrust.api.app import create_app
from fleettrust.config import Settings
from fleettrust.services.context import ServiceContext


def build_app_from_env() -> object:
    """Factory for ``uvicorn --factory`` with several workers (settings from the environment)."""
    return create_app(ServiceContext.create(Settings.load()))


def run_server(settings: Settings, *, workers: int = 1) -> None:
    if workers > 1:
        import os

        os.environ["FLEETTRUST_DATA_DIR"] = str(settings.data_dir)
        os.environ["FLEETTRUST_DATABASE_URL"] = settings.database_url
        os.environ["FLEETTRUST_PUBLIC_BASE_URL"] = settings.public_base_url
        uvicorn.run("fleettrust.api.server:build_app_from_env", factory=True,
                    host=settings.host, port=settings.port, workers=workers,
                    log_level="info", proxy_headers=False)
        return
    ctx = ServiceContext.create(settings)
    uvicorn.run(create_app(ctx), host=settings.host, port=settings.port, log_level="info",
                proxy_headers=False)
