"""Run the real ``fleettrust agent`` CLI in a subprocess, with a start marker for kill tests.

Imports everything the agent commands need first, then prints ``READY`` on stdout (flushed), then
runs the CLI with ``sys.argv[1:]``: a test that SIGKILLs the process at a random delay after the
marker hits the agent's real work (key generation, requests, state writes) and not the Python
start-up. Uses ``fleettrust agent`` from the main CLI when the lead has registered it there, and
the agent's own Typer app (the same commands) otherwise.
"""

from __future__ import annotations

import sys

import httpcore
import httpx
import typer
import typer._adapters  # what Typer imports lazily on the first parse

import fleettrust.agent.enroll
import fleettrust.agent.manifest
import fleettrust.agent.runner
from fleettrust.cli.agent import agent_app

_PRELOADED = (httpcore, httpx, typer._adapters, fleettrust.agent.enroll,
              fleettrust.agent.manifest, fleettrust.agent.runner)


def _main_app() -> typer.Typer | None:
    try:
        from fleettrust.cli.main import app
    except ImportError:  # pragma: no cover - the main CLI always exists in this project
        return None
    groups = getattr(app, "registered_groups", [])
    if any(getattr(group, "name", None) == "agent" for group in groups):
        return app
    return None


def main() -> None:
    app = _main_app()
    args = sys.argv[1:]
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    if app is not None:
        app(args=["agent", *args], prog_name="fleettrust")
    else:
        agent_app(args=args, prog_name="fleettrust agent")


if __name__ == "__main__":
    main()
