"""Pieces every CLI module shares: the Rich consoles and the --server/--token options."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

DEFAULT_SERVER = "http://127.0.0.1:8080"
ServerOpt = Annotated[
    str, typer.Option("--server", envvar="FLEETTRUST_SERVER", help="API base URL")
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="FLEETTRUST_TOKEN", help="API token", show_default=False),
]


def make_console(stderr: bool) -> Console:
    """No emoji codes (":CD:" in a fingerprint is not a disc), no guessing highlights, no hard
    wrapping of long tokens; piped output gets a wide fixed width so tables are not truncated."""
    stream = sys.stderr if stderr else sys.stdout
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return Console(
        stderr=stderr, emoji=False, highlight=False, soft_wrap=True, width=None if tty else 240
    )
