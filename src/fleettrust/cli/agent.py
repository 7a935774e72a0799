"""``fleettrust agent …`` (the device agent) and ``fleettrust simulate`` (the fleet simulator).

The lead registers them in ``cli/main.py``::

    from fleettrust.cli.agent import agent_app, simulate
    app.add_typer(agent_app, name="agent")
    app.command("simulate")(simulate)

Thin wrappers over :mod:`fleettrust.agent`; errors become one red line and an exit code:
1 error, 2 usage, 3 check-in refused (``run --once``), 4 gateway unreachable (``run --once``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fleettrust.errors import FleetTrustError

agent_app = typer.Typer(no_args_is_help=True,
                        help="The device agent: enrollment at the factory, check-ins, renewal.")

_out = Console()
_err = Console(stderr=True)

StateDirOpt = Annotated[Path, typer.Option("--state-dir", envvar="FLEETTRUST_AGENT_STATE_DIR",
                                           help="the agent's state directory")]
Pkcs11PinFileOpt = Annotated[Path | None, typer.Option(
    "--pkcs11-pin-file", help="file holding the token user PIN "
    "(else $FLEETTRUST_AGENT_PKCS11_PIN)")]


def _fail(message: str, code: int = 1) -> NoReturn:
    _err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _pin(pin_file: Path | None) -> str | None:
    if pin_file is not None:
        try:
            return pin_file.read_text().strip() or None
        except OSError as exc:
            _fail(f"cannot read {pin_file}: {exc.strerror}")
    return os.environ.get("FLEETTRUST_AGENT_PKCS11_PIN") or None


def _setup_logging(level: str) -> None:
    numeric = getattr(logging, level.upper(), None)
    if not isinstance(numeric, int):
        _fail(f"unknown log level {level!r}", 2)
    logging.basicConfig(level=numeric, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("httpcore").setLevel(max(numeric, logging.WARNING))


# --- enroll / install ------------------------------------------------------------------------


@agent_app.command("enroll")
def enroll_cmd(
    state_dir: StateDirOpt,
    manifest_file: Annotated[Path | None, typer.Option(
        "--manifest-file", help="manifest override JSON (replaces or extends the gathered one)")
    ] = None,
    gateway: Annotated[str | None, typer.Option(
        "--gateway", help="device gateway URL to remember for `agent run`")] = None,
    server: Annotated[str | None, typer.Option(
        "--server", help="operator API: submit the request and install the result now")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="FLEETTRUST_TOKEN", help="factory token (with --server)")] = None,
    batch: Annotated[str | None, typer.Option("--batch", help="batch id (with --server)")] = None,
    station: Annotated[str | None, typer.Option("--station", help="station name")] = None,
    expect_root_fingerprint: Annotated[str | None, typer.Option(
        "--expect-root-fingerprint", help="SHA-256 fingerprint the fleet root must have")] = None,
    pkcs11: Annotated[bool, typer.Option(
        "--pkcs11", help="generate the key on a PKCS#11 token (enrollment only: see docs)")
    ] = False,
    pkcs11_module: Annotated[str | None, typer.Option(
        "--pkcs11-module", envvar="FLEETTRUST_AGENT_PKCS11_MODULE")] = None,
    pkcs11_token: Annotated[str | None, typer.Option(
        "--pkcs11-token", envvar="FLEETTRUST_AGENT_PKCS11_TOKEN")] = None,
    pkcs11_pin_file: Pkcs11PinFileOpt = None,
    force: Annotated[bool, typer.Option("--force", help="replace an enrolled identity")] = False,
) -> None:
    """Generate the device key and write enroll-request.json ({csr, manifest}).

    With --server/--token/--batch, also submit it to the operator API and install the result.
    """
    from fleettrust.agent.enroll import enroll, install, submit_enrollment
    from fleettrust.agent.manifest import gather_manifest

    submit = [server, token, batch]
    if any(submit) and not all(submit):
        _fail("--server, --token and --batch go together", 2)
    config: Any = None
    if pkcs11:
        from fleettrust.signing.pkcs11 import Pkcs11Config

        pin = _pin(pkcs11_pin_file)
        if not pkcs11_module or not pkcs11_token or not pin:
            _fail("--pkcs11 needs --pkcs11-module, --pkcs11-token and a PIN "
                  "($FLEETTRUST_AGENT_PKCS11_PIN or --pkcs11-pin-file)", 2)
        config = Pkcs11Config(module=pkcs11_module, token_label=pkcs11_token, user_pin=pin)
    try:
        manifest = gather_manifest(override_file=manifest_file)
        request = enroll(state_dir, manifest=manifest, manifest_override_file=manifest_file,
                         pkcs11=config, gateway_url=gateway, operator_url=server, force=force)
        _out.print(f"enrollment request written to {request.path}")
        if server and token and batch:
            response = submit_enrollment(server, token, batch, request, station=station)
            state = install(state_dir, response, expected_root_fingerprint=expect_root_fingerprint,
                            pkcs11_pin=config.user_pin if config is not None else None)
            _out.print(f"enrolled device {state.device_id} (certificate {state.certificate_serial},"
                       f" valid until {state.certificate_not_after})")
            _out.print(f"pinned fleet root: {state.root_fingerprint}")
    except FleetTrustError as exc:
        _fail(f"{exc.message} ({exc.code})")


@agent_app.command("install")
def install_cmd(
    state_dir: StateDirOpt,
    response: Annotated[Path, typer.Option(
        "--response", help="operator API response of POST /v1/batches/{id}/devices (JSON)")],
    expect_root_fingerprint: Annotated[str | None, typer.Option(
        "--expect-root-fingerprint", help="SHA-256 fingerprint the fleet root must have")] = None,
    pkcs11_pin_file: Pkcs11PinFileOpt = None,
) -> None:
    """Store the issued certificate, chain and (pinned) root."""
    from fleettrust.agent.enroll import install

    try:
        doc = json.loads(response.read_text())
    except (OSError, ValueError) as exc:
        _fail(f"cannot read the response {response}: {exc}")
    if not isinstance(doc, dict):
        _fail(f"{response} must hold a JSON object")
    try:
        state = install(state_dir, doc, expected_root_fingerprint=expect_root_fingerprint,
                        pkcs11_pin=_pin(pkcs11_pin_file))
    except FleetTrustError as exc:
        _fail(f"{exc.message} ({exc.code})")
    _out.print(f"enrolled device {state.device_id} (certificate {state.certificate_serial}, "
               f"valid until {state.certificate_not_after})")
    _out.print(f"pinned fleet root: {state.root_fingerprint}")


# --- run / status ----------------------------------------------------------------------------


@agent_app.command("run")
def run_cmd(
    state_dir: StateDirOpt,
    gateway: Annotated[str | None, typer.Option(
        "--gateway", envvar="FLEETTRUST_GATEWAY", help="device gateway URL (https://…)")] = None,
    once: Annotated[bool, typer.Option("--once", help="one check-in attempt, then exit")] = False,
    max_checkins: Annotated[int | None, typer.Option(
        "--max-checkins", min=1, help="exit after N successful check-ins")] = None,
    firmware_version: Annotated[str | None, typer.Option(
        "--firmware-version", envvar="FLEETTRUST_FIRMWARE_VERSION")] = None,
    manifest_file: Annotated[Path | None, typer.Option(
        "--manifest-file", help="manifest override (default: the one used at enrollment)")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=1.0, max=300.0,
                                           help="per-request timeout, seconds")] = 10.0,
    log_level: Annotated[str, typer.Option("--log-level")] = "INFO",
) -> None:
    """Check in with the gateway over mTLS until SIGTERM (renewing the certificate when due).

    Exit codes with --once: 0 ok, 3 refused by the gateway, 4 gateway unreachable/failing.
    """
    from fleettrust.agent.runner import DEFAULT_FIRMWARE_VERSION, Agent, AgentConfig

    _setup_logging(log_level)
    config = AgentConfig(state_dir=state_dir, gateway_url=gateway,
                         firmware_version=firmware_version or DEFAULT_FIRMWARE_VERSION,
                         manifest_file=manifest_file, timeout_s=timeout,
                         pkcs11_pin=os.environ.get("FLEETTRUST_AGENT_PKCS11_PIN") or None)
    agent = Agent(config)
    try:
        agent.start()
    except FleetTrustError as exc:
        _fail(f"{exc.message} ({exc.code})")
    try:
        with agent.signal_handlers():
            summary = agent.run(once=once, max_checkins=max_checkins)
    except FleetTrustError as exc:
        _fail(f"{exc.message} ({exc.code})")
    finally:
        agent.close()
    raise typer.Exit(summary.exit_code)


@agent_app.command("status")
def status_cmd(
    state_dir: StateDirOpt,
    as_json: Annotated[bool, typer.Option("--json", help="print state.json")] = False,
    pkcs11_pin_file: Pkcs11PinFileOpt = None,
) -> None:
    """Validate the state directory and show the device's identity and last check-in."""
    from fleettrust.agent.state import StateStore

    store = StateStore(state_dir)
    try:
        state = store.read()
        if state.key.kind == "file" or _pin(pkcs11_pin_file):
            store.load(pkcs11_pin=_pin(pkcs11_pin_file))
    except FleetTrustError as exc:
        _fail(f"{exc.message} ({exc.code})")
    if as_json:
        _out.print_json(json.dumps(state.to_json()))
        return
    table = Table("field", "value", show_header=False)
    last = state.last_checkin
    rows = [
        ("phase", state.phase), ("device id", state.device_id or "-"),
        ("generation", str(state.generation)), ("boot counter", str(state.boot_counter)),
        ("key", state.key.file or state.key.key_id or "-"),
        ("certificate", f"{state.certificate_serial or '-'} until "
                        f"{state.certificate_not_after or '-'}"),
        ("pinned root", state.root_fingerprint or "-"), ("gateway", state.gateway_url or "-"),
        ("check-ins ok", str(state.checkins_ok)),
        ("last check-in", "-" if last is None else
         f"{last.at} {last.outcome} {last.http_status or ''} {last.code or ''}".strip()),
        ("renewals", str(state.renewal.count)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    _out.print(table)


# --- simulate --------------------------------------------------------------------------------


def _snapshot_table(snap: Any) -> Table:
    table = Table(title=f"fleettrust simulate — {snap.phase}", show_header=False)
    table.add_row("elapsed", f"{snap.elapsed_s:.1f} s")
    table.add_row("devices", f"{snap.devices_ready}/{snap.devices_total}")
    table.add_row("check-ins ok / failed", f"{snap.checkins_ok} / {snap.checkins_failed}")
    table.add_row("rate", f"{snap.rate_per_s:.0f} check-ins/s")

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    table.add_row("latency p50/p90/p99", f"{ms(snap.p50_ms)} / {ms(snap.p90_ms)} / "
                                         f"{ms(snap.p99_ms)} ms")
    table.add_row("connections (resumed)", f"{snap.connections} ({snap.resumed})")
    table.add_row("renewals", str(snap.renewals))
    for code, count in sorted(snap.errors.items(), key=lambda kv: -kv[1])[:8]:
        table.add_row(f"error {code}", str(count))
    return table


def simulate(
    devices: Annotated[int, typer.Option("--devices", min=1, help="number of virtual devices")],
    gateway: Annotated[str, typer.Option("--gateway", help="device gateway URL (loopback)")],
    duration: Annotated[float, typer.Option("--duration", help="check-in phase, seconds")] = 30.0,
    server: Annotated[str | None, typer.Option(
        "--server", help="operator API URL (loopback), to enroll missing devices")] = None,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="FLEETTRUST_TOKEN", help="factory or admin token")] = None,
    batch: Annotated[str | None, typer.Option("--batch", help="batch id to enroll into")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1)] = 32,
    state_root: Annotated[Path | None, typer.Option(
        "--state-root", help="keep/reuse virtual devices here (default: temporary)")] = None,
    mode: Annotated[str, typer.Option(
        "--mode", help="keepalive | handshake (new connection per check-in) | resume")
    ] = "keepalive",
    max_checkins: Annotated[int | None, typer.Option("--max-checkins", min=1)] = None,
    checkins_per_connection: Annotated[int | None, typer.Option(
        "--checkins-per-connection", min=1, help="keepalive: reconnect after N check-ins")
    ] = None,
    enroll_chunk: Annotated[int, typer.Option("--enroll-chunk", min=1, max=10000)] = 500,
    json_out: Annotated[Path | None, typer.Option(
        "--json-out", help="write the final JSON summary here")] = None,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Rich live display")] = True,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
) -> None:
    """Enroll N virtual devices (real keys and certificates) and run their check-ins
    concurrently against a LOOPBACK gateway; report check-ins/s, latency and errors."""
    from fleettrust.agent.simulator import (
        SimulationConfig,
        SimulationError,
        report_json,
        run_simulation,
    )

    config = SimulationConfig(
        devices=devices, gateway=gateway, duration_s=duration, server=server, token=token,
        batch_id=batch, concurrency=concurrency, state_root=state_root,
        mode=mode,  # type: ignore[arg-type]  # validated by SimulationConfig.validate
        max_checkins=max_checkins, checkins_per_connection=checkins_per_connection,
        enroll_chunk=enroll_chunk, seed=seed)
    try:
        config.validate()
    except SimulationError as exc:
        _fail(f"{exc.message} ({exc.code})", 2)
    try:
        if live and _out.is_terminal:
            with Live(console=_out, refresh_per_second=4, transient=False) as display:
                report = run_simulation(
                    config, on_progress=lambda snap: display.update(_snapshot_table(snap)))
        else:
            report = run_simulation(config)
    except FleetTrustError as exc:
        _fail(f"{exc.message} ({exc.code})")
    text = report_json(report)
    if json_out is not None:
        json_out.write_text(text + "\n")
        _out.print(f"summary written to {json_out}")
    _out.print_json(text)
