"""Entry point of ``fleettrust serve``: run the operator API and the device gateway.

Thin: the runtime (``api.runtime``) runs the listeners and background jobs; this module makes
sure every job module is imported (so it registers itself) before the runtime starts.
"""

from __future__ import annotations

from fleettrust.api import jobs  # noqa: F401 - registers the background jobs
from fleettrust.api.runtime import run
from fleettrust.config import Settings


def run_server(settings: Settings, *, workers: int = 1) -> None:
    run(settings, workers=workers)
