"""Run the real ``fleettrust agent`` CLI in a subprocess, with a start marker for kill tests.

``python -m tests.e2e.agent_main ARGS…`` imports everything the agent commands need first, then
prints ``READY`` on stdout (flushed), then runs the CLI with ARGS: a test that SIGKILLs the
process at a random delay after the marker hits the agent's real work (key generation,
requests, state writes) and not the Python start-up.

``python -m tests.e2e.agent_main --zygote`` imports the same once and then, for every JSON line
``{"args": [...], "out": path, "err": path}`` on stdin, forks a child that runs the CLI with
stdout/stderr redirected to those files (``READY`` first, as above), answers the child's pid
on stdout, waits for it and answers its raw wait status. The kill tests use it to run many
agents without paying Python's start-up for each.

Uses ``fleettrust agent`` from the main CLI when the lead has registered it there, and the
agent's own Typer app (the same commands) otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
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


def run_cli(args: list[str]) -> int:
    """``READY``, then the agent CLI; returns its exit code."""
    app = _main_app()
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    try:
        if app is not None:
            app(args=["agent", *args], prog_name="fleettrust")
        else:
            agent_app(args=args, prog_name="fleettrust agent")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def _child(request: dict[str, object]) -> None:  # never returns
    code = 1
    try:
        for fd, name in ((1, "out"), (2, "err")):
            target = os.open(str(request[name]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(target, fd)
            os.close(target)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        args = request["args"]
        assert isinstance(args, list)
        code = run_cli([str(a) for a in args])
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # exiting anyway
                stream.flush()
        os._exit(code)


def zygote() -> None:
    protocol = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        request = json.loads(line)
        protocol.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        protocol.write(f"{pid}\n")
        protocol.flush()
        _, status = os.waitpid(pid, 0)
        protocol.write(f"{status}\n")
        protocol.flush()


def main() -> None:
    if sys.argv[1:] == ["--zygote"]:
        zygote()
        return
    sys.exit(run_cli(sys.argv[1:]))


if __name__ == "__main__":
    main()
