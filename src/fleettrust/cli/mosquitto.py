"""``fleettrust mosquitto configure`` / ``sync``: keep a Mosquitto broker in line with revocations.

Local commands (they use the database and key store directly, like ``fleettrust serve``); run them
on the broker's host. See :mod:`fleettrust.revocation.mosquitto`.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from fleettrust.errors import FleetTrustError

mosquitto_app = typer.Typer(no_args_is_help=True,
                            help="Mosquitto broker integration (TLS, CRL bundle, kicks).")

DirOpt = Annotated[Path, typer.Option("--dir", help="directory of the broker's files")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", envvar="FLEETTRUST_DATA_DIR",
                                                 help="server data directory [default: ./data]",
                                                 show_default=False)]
DbUrlOpt = Annotated[str | None, typer.Option("--database-url", envvar="FLEETTRUST_DATABASE_URL",
                                              help="SQLAlchemy URL", show_default=False)]


def _fail(exc: Exception) -> typer.Exit:
    code = exc.code if isinstance(exc, FleetTrustError) else type(exc).__name__
    msg = exc.message if isinstance(exc, FleetTrustError) else str(exc)
    print(f"error: {msg} ({code})", file=sys.stderr)
    return typer.Exit(1)


@mosquitto_app.command("configure")
def configure_cmd(
    directory: DirOpt,
    port: Annotated[int, typer.Option("--port", help="TLS listener port for devices")] = 8883,
    host: Annotated[str, typer.Option("--host", help="TLS listener address ('' = all)")] = "",
    admin_port: Annotated[int, typer.Option(
        "--admin-port", help="plain 127.0.0.1 listener for fleettrust's admin client")] = 1884,
    dns_name: Annotated[list[str] | None, typer.Option(
        "--dns-name", help="DNS name in the broker certificate (repeatable)")] = None,
    ip: Annotated[list[str] | None, typer.Option(
        "--ip", help="IP address in the broker certificate (repeatable) [default: 127.0.0.1]")
    ] = None,
    user: Annotated[str | None, typer.Option(
        "--user", help="system user Mosquitto runs as (files are chowned to it)")] = None,
    data_dir: DataDirOpt = None,
    database_url: DbUrlOpt = None,
) -> None:
    """Write mosquitto.conf, the CA and CRL bundles, the broker certificate and dynsec files."""
    from fleettrust.config import Settings
    from fleettrust.revocation.mosquitto import MosquittoOptions, configure
    from fleettrust.services.context import ServiceContext

    try:
        settings = Settings.load(data_dir=data_dir, database_url=database_url)
        ctx = ServiceContext.create(settings)
        try:
            setup = configure(ctx, directory, MosquittoOptions(
                tls_port=port, tls_host=host, admin_port=admin_port,
                dns_names=tuple(dns_name or ()),
                ip_addresses=tuple(ip if ip is not None else ["127.0.0.1"]), user=user))
        finally:
            ctx.close()
    except (FleetTrustError, OSError) as exc:
        raise _fail(exc) from exc
    print(f"wrote {setup.files.conf}")
    print(f"start the broker with: mosquitto -c {setup.files.conf}")
    print(f"then keep it current with: fleettrust mosquitto sync --dir {setup.files.dir} "
          "--follow")


@mosquitto_app.command("sync")
def sync_cmd(
    directory: DirOpt,
    follow: Annotated[bool, typer.Option("--follow", help="keep running, apply each new "
                                                          "revocation at once")] = False,
    pid: Annotated[int | None, typer.Option("--pid", help="Mosquitto's pid [default: from "
                                                          "its pid_file]")] = None,
    data_dir: DataDirOpt = None,
    database_url: DbUrlOpt = None,
) -> None:
    """Rewrite the CRL bundle, SIGHUP the broker and kick newly revoked devices."""
    from fleettrust.config import Settings
    from fleettrust.revocation.mosquitto import MosquittoSync
    from fleettrust.services.context import ServiceContext

    try:
        settings = Settings.load(data_dir=data_dir, database_url=database_url)
        ctx = ServiceContext.create(settings)
        try:
            sync = MosquittoSync(ctx, directory, pid=pid)
            if follow:
                signal.signal(signal.SIGTERM, lambda *_: sync.stop(0))
                try:
                    sync.follow()
                except KeyboardInterrupt:
                    sync.stop(0)
                return
            report = sync.sync_once(force_reload=True)
            sync.stop()
        finally:
            ctx.close()
    except (FleetTrustError, OSError) as exc:
        raise _fail(exc) from exc
    print(f"seq {report.seq}: broker {'reloaded' if report.reloaded else 'not reloaded'}, "
          f"{len(report.kicked)} device(s) kicked")
