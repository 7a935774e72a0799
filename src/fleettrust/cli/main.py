"""Typer commands. Thin: local commands call services/ceremony, the rest call the HTTP API.

Local (no server needed): ``init``, ``serve``, ``db upgrade``, ``ca init-root`` and ``ca sign``
(the offline ceremony). Every other command is an HTTP client of ``fleettrust serve``: it takes
``--server``/``--token`` (or ``FLEETTRUST_SERVER``/``FLEETTRUST_TOKEN``) and holds no policy.

Heavy modules (httpx, SQLAlchemy, cryptography, uvicorn, segno) are imported inside the commands
that need them so that ``fleettrust --help`` stays fast. API errors print
``error: <detail> (<code>, HTTP <status>)`` on stderr and exit 1.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.markup import escape

from fleettrust import __version__
from fleettrust.cli.agent import agent_app, simulate
from fleettrust.cli.common import DEFAULT_SERVER, ServerOpt, TokenOpt, make_console
from fleettrust.cli.log import device_history, log_app
from fleettrust.cli.mosquitto import mosquitto_app
from fleettrust.cli.revoke import ca_root_crl, revoke_app
from fleettrust.errors import FleetTrustError

if TYPE_CHECKING:
    from fleettrust.cli.client import ApiError, Client

app = typer.Typer(no_args_is_help=True, help="fleettrust: trust for an IoT fleet.",
                  pretty_exceptions_enable=False, rich_markup_mode=None)
ca_app = typer.Typer(no_args_is_help=True, help="The certificate hierarchy and its ceremony.")
factory_app = typer.Typer(no_args_is_help=True, help="Factories and their issuing CAs.")
batch_app = typer.Typer(no_args_is_help=True, help="Production batches.")
device_app = typer.Typer(no_args_is_help=True, help="Devices: issuance, registry, claiming.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens.")
db_app = typer.Typer(no_args_is_help=True, help="Database maintenance (local).")
app.add_typer(ca_app, name="ca")
app.add_typer(factory_app, name="factory")
app.add_typer(batch_app, name="batch")
app.add_typer(device_app, name="device")
app.add_typer(token_app, name="token")
app.add_typer(db_app, name="db")


out = make_console(stderr=False)
err = make_console(stderr=True)
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", envvar="FLEETTRUST_DATA_DIR",
                                                 help="server data directory [default: ./data]",
                                                 show_default=False)]
DbUrlOpt = Annotated[str | None, typer.Option("--database-url", envvar="FLEETTRUST_DATABASE_URL",
                                              help="SQLAlchemy URL [default: SQLite in the data "
                                                   "directory]", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fleettrust {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="print the version and exit")] = False,
) -> None:
    """fleettrust: trust for an IoT fleet (offline-root PKI, factories, device certificates)."""


# --- output and error helpers ------------------------------------------------------------------


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def describe(exc: ApiError) -> str:
    """One line for an API error: ``<detail> (<code>, HTTP <status>)``."""
    if exc.unreachable:
        return (f"{exc.detail} — is `fleettrust serve` running there? "
                "(set --server or FLEETTRUST_SERVER)")
    return f"{exc.detail} ({exc.code}, HTTP {exc.status})"


def _print_item_errors(exc: ApiError, limit: int = 50) -> None:
    """The per-item errors of a problem document, one indented line each."""
    for e in exc.errors[:limit]:
        line = e.get("line")
        where = f"line {line}" if isinstance(line, int) else e.get("location", "request")
        code = e.get("code")
        message = e.get("message", "")
        text = f"{where}: {code}: {message}" if code else f"{where}: {message}"
        err.print(f"  {escape(text)}")
    if len(exc.errors) > limit:
        err.print(f"  … and {len(exc.errors) - limit} more")


def _client(server: str, token: str | None) -> Client:
    from fleettrust.cli.client import Client

    if not token:
        fail("no API token: pass --token or set FLEETTRUST_TOKEN", 2)
    return Client(server, token)


def call(server: str, token: str | None, method: str, path: str, **kw: Any) -> Any:
    """One API request; on an error answer print it and exit 1."""
    from fleettrust.cli.client import ApiError

    with _client(server, token) as client:
        try:
            return client.request(method, path, **kw)
        except ApiError as exc:
            # A single-item request repeats its only line error in ``detail``.
            if len(exc.errors) > 1 or any("location" in e for e in exc.errors):
                _print_item_errors(exc)
            fail(describe(exc))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return str(value)


def emit(data: Any, as_json: bool, columns: list[str] | None = None) -> None:
    if as_json or columns is None:
        typer.echo(json.dumps(data, indent=2, default=str))
        return
    from rich.table import Table

    rows = data if isinstance(data, list) else [data]
    table = Table()
    for c in columns:
        is_id = c == "id" or c.endswith("_id")
        table.add_column(c, no_wrap=is_id, overflow="fold")
    for r in rows:
        table.add_row(*[escape(_cell(r.get(c))) for c in columns])
    out.print(table)


def _read_text(path: Path, what: str = "file") -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        fail(f"cannot read {what} {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        fail(f"{what} {path} is not UTF-8 text")


def _read_secret(file: Path | None, env: str, prompt: str, confirm: bool) -> bytes:
    """A passphrase or PIN from a file, an environment variable or a hidden prompt."""
    if file is not None:
        value = _read_text(file, "passphrase file").strip()
        if not value:
            fail(f"{file} is empty")
        return value.encode()
    if os.environ.get(env):
        return os.environ[env].encode()
    if not sys.stdin.isatty():
        fail(f"no passphrase: use --passphrase-file or set {env}")
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)).encode()


def _write_private(path: Path, data: str | bytes) -> None:
    """Write a secret file readable by its owner only (0600), replacing any old content."""
    raw = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(raw)
    path.chmod(0o600)


@contextmanager
def _local_errors() -> Iterator[None]:
    """Errors of local commands (settings, database, ceremony) as one clean line."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except FleetTrustError as exc:
        fail(f"{exc.message} ({exc.code})")
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        fail(f"{exc.strerror or exc}{where}")
    except Exception as exc:
        if type(exc).__module__.startswith("sqlalchemy"):
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(f"database error: {first}")
        raise


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- local: init, serve, db --------------------------------------------------------------------


@app.command()
def init(
    data_dir: DataDirOpt = None,
    database_url: DbUrlOpt = None,
    token_file: Annotated[Path | None, typer.Option(
        "--token-file", help="also write a new admin token to this file (mode 0600)")] = None,
) -> None:
    """Create the data directory, migrate the database and print the first admin token."""
    with _local_errors():
        from fleettrust.config import Settings
        from fleettrust.services.bootstrap import initialize

        settings = Settings.load(data_dir=data_dir, database_url=database_url)
        result = initialize(settings)
    out.print(f"data directory: {escape(str(settings.data_dir))}")
    if result.admin_token:
        out.print(f"first admin token (shown once): [bold]{escape(result.admin_token)}[/]")
        if token_file is not None:
            _write_private(token_file, result.admin_token + "\n")
            out.print(f"admin token also written to {escape(str(token_file))} (mode 0600)")
    else:
        out.print("an admin token already exists; none created")


@app.command()
def serve(
    data_dir: DataDirOpt = None,
    host: Annotated[str | None, typer.Option(envvar="FLEETTRUST_HOST",
                                             help="[default: 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option(envvar="FLEETTRUST_PORT",
                                             help="[default: 8080]")] = None,
    database_url: DbUrlOpt = None,
    gateway_port: Annotated[int | None, typer.Option(
        envvar="FLEETTRUST_GATEWAY_PORT", help="device gateway (mTLS) port [default: 8443]")]
    = None,
    workers: Annotated[int, typer.Option(min=1, max=32)] = 1,
) -> None:
    """Run the API server (migrates the database; prints a first admin token on a fresh one)."""
    with _local_errors():
        from fleettrust.api.server import run_server
        from fleettrust.config import Settings
        from fleettrust.services.bootstrap import initialize

        settings = Settings.load(data_dir=data_dir, database_url=database_url, host=host,
                                 port=port, gateway_port=gateway_port)
        result = initialize(settings)
    out.print(f"fleettrust API listening on http://{settings.host}:{settings.port}"
              f" (data directory {escape(str(settings.data_dir))})")
    if result.admin_token:
        out.print(f"first admin token (shown once): [bold]{escape(result.admin_token)}[/]")
    sys.stdout.flush()
    with _local_errors():
        run_server(settings, workers=workers)


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDirOpt = None, database_url: DbUrlOpt = None) -> None:
    """Apply database migrations."""
    with _local_errors():
        from fleettrust.config import Settings
        from fleettrust.storage.db import make_engine
        from fleettrust.storage.migrate import current_revision, upgrade

        settings = Settings.load(data_dir=data_dir, database_url=database_url)
        engine = make_engine(settings.database_url)
        try:
            upgrade(engine)
            revision = current_revision(engine)
        finally:
            engine.dispose()
    out.print(f"database at revision {revision}")


# --- the offline ceremony ----------------------------------------------------------------------


RootDirOpt = Annotated[Path, typer.Option("--dir", help="offline root CA directory")]
PassFileOpt = Annotated[Path | None, typer.Option(
    "--passphrase-file", help="file holding the root key passphrase "
                              "(else $FLEETTRUST_ROOT_PASSPHRASE, else a prompt)")]

OFFLINE_NOTE = (
    "NOTE: this convenience ceremony keeps the root CA key in {dir} on THIS machine. In "
    "production the root lives on an offline machine: run `fleettrust ca init-root` and "
    "`fleettrust ca sign` there and carry only the CSR and the signed certificate across."
)


@ca_app.command("init-root")
def ca_init_root(
    dir: RootDirOpt,
    passphrase_file: PassFileOpt = None,
    curve: Annotated[str, typer.Option(help="p256 or p384")] = "p384",
    common_name: Annotated[str, typer.Option("--cn")] = "Fleet Root CA",
    organization: Annotated[str, typer.Option("--org")] = "fleettrust fleet",
    validity_days: Annotated[int, typer.Option(min=365, max=36500)] = 9125,
    pkcs11: Annotated[bool, typer.Option("--pkcs11", help="keep the key in a PKCS#11 token")]
    = False,
    pkcs11_module: Annotated[str | None, typer.Option(envvar="FLEETTRUST_PKCS11_MODULE")] = None,
    pkcs11_token: Annotated[str | None, typer.Option(envvar="FLEETTRUST_PKCS11_TOKEN")] = None,
) -> None:
    """Create the root CA (offline). Prints its SHA-256 fingerprint."""
    with _local_errors():
        from fleettrust import ceremony
        from fleettrust.signing.base import SignerAlgorithm

        alg = {"p256": SignerAlgorithm.EC_P256, "p384": SignerAlgorithm.EC_P384}.get(curve)
        if alg is None:
            fail("--curve must be p256 or p384")
        cfg: object | None = None
        passphrase: bytes | None = None
        if pkcs11:
            from fleettrust.signing.pkcs11 import Pkcs11Config

            if not pkcs11_module or not pkcs11_token:
                fail("--pkcs11 needs --pkcs11-module and --pkcs11-token")
            pin = _read_secret(None, "FLEETTRUST_PKCS11_PIN", "Token PIN", False).decode()
            cfg = Pkcs11Config(module=pkcs11_module, token_label=pkcs11_token, user_pin=pin)
        else:
            passphrase = _read_secret(passphrase_file, "FLEETTRUST_ROOT_PASSPHRASE",
                                      "Root key passphrase", True)
        info = ceremony.init_root(dir, passphrase=passphrase, now=_now(),
                                  common_name=common_name, organization=organization,
                                  algorithm=alg, validity_days=validity_days, pkcs11=cfg)
    out.print(f"root CA created in {escape(str(info.directory))} (key: {info.key_backend})")
    out.print(f"SHA-256 fingerprint: {info.fingerprint}")


@ca_app.command("sign")
def ca_sign(
    dir: RootDirOpt,
    csr: Annotated[Path, typer.Option(help="the fleet CA's CSR (PEM)")],
    out_file: Annotated[Path, typer.Option("--out", help="where to write the certificate")],
    passphrase_file: PassFileOpt = None,
    path_length: Annotated[int, typer.Option(min=0, max=4)] = 2,
    validity_days: Annotated[int, typer.Option(min=30, max=36500)] = 5475,
) -> None:
    """Sign the fleet CA's CSR with the offline root (offline)."""
    csr_pem = _read_text(csr, "CSR").encode()
    with _local_errors():
        from cryptography.hazmat.primitives import serialization

        from fleettrust import ceremony, pki

        meta_file = dir / ceremony.ROOT_META
        is_pkcs11 = False
        if meta_file.exists():
            try:
                is_pkcs11 = json.loads(meta_file.read_text()).get("key_backend") == "pkcs11"
            except (OSError, ValueError, AttributeError):
                fail(f"{meta_file} is unreadable or corrupt")
        passphrase = pin = None
        if is_pkcs11:
            pin = _read_secret(None, "FLEETTRUST_PKCS11_PIN", "Token PIN", False).decode()
        else:
            passphrase = _read_secret(passphrase_file, "FLEETTRUST_ROOT_PASSPHRASE",
                                      "Root key passphrase", False)
        cert = ceremony.sign_ca_csr(dir, csr_pem, passphrase=passphrase, now=_now(),
                                    path_length=path_length, validity_days=validity_days,
                                    pkcs11_pin=pin)
        out_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        fingerprint = pki.fingerprint_sha256(cert)
    out.print(f"signed {escape(cert.subject.rfc4514_string())} -> {escape(str(out_file))}")
    out.print(f"SHA-256 fingerprint: {fingerprint}")


@ca_app.command("fleet-csr")
def ca_fleet_csr(
    out_file: Annotated[Path, typer.Option("--out", help="where to write the CSR")],
    common_name: Annotated[str, typer.Option("--cn")] = "Fleet CA",
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Have the server generate the fleet CA key and return its CSR."""
    res = call(server, token, "POST", "/v1/hierarchy/fleet-ca/csr",
               json={"common_name": common_name})
    out_file.write_text(res["csr_pem"])
    out.print(f"fleet CA CSR written to {escape(str(out_file))}; "
              "carry it to the offline machine and sign it with `fleettrust ca sign`")


@ca_app.command("import-fleet")
def ca_import_fleet(
    certificate: Annotated[Path, typer.Argument(help="signed fleet CA certificate (PEM)")],
    root: Annotated[Path, typer.Option(help="the root certificate (PEM, public)")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Import the signed fleet CA certificate and the (public) root certificate."""
    body = {"certificate_pem": _read_text(certificate, "certificate"),
            "root_pem": _read_text(root, "root certificate")}
    res = call(server, token, "POST", "/v1/hierarchy/fleet-ca/certificate", json=body)
    out.print(f"fleet CA {res['fleet_ca_id']} active; root fingerprint {res['root_fingerprint']}")


def _active_fleet_ca(server: str, token: str | None) -> str | None:
    for ca in call(server, token, "GET", "/v1/hierarchy"):
        if ca.get("kind") == "fleet" and ca.get("status") == "active":
            return str(ca["id"])
    return None


@ca_app.command("bootstrap")
def ca_bootstrap(
    dir: RootDirOpt,
    passphrase_file: PassFileOpt = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Quickstart convenience: init-root (if absent), fleet CSR, offline sign, import.

    Runs in this CLI process, not in the server: the server never sees the root key. Does
    nothing when the server already has an active fleet CA.
    """
    existing = _active_fleet_ca(server, token)
    if existing is not None:
        out.print(f"fleet CA {existing} is already active; ceremony skipped")
        return
    with _local_errors():
        from cryptography.hazmat.primitives import serialization

        from fleettrust import ceremony

        fresh = not (dir / ceremony.ROOT_CERT).exists()
        passphrase = _read_secret(passphrase_file, "FLEETTRUST_ROOT_PASSPHRASE",
                                  "Root key passphrase", fresh)
        if fresh:
            info = ceremony.init_root(dir, passphrase=passphrase, now=_now())
            out.print(f"root CA created in {escape(str(dir))}; "
                      f"SHA-256 fingerprint {info.fingerprint}")
        else:
            out.print(f"using the existing root CA in {escape(str(dir))}")
        # Check the passphrase before the server generates a fleet key for nothing.
        ceremony.load_root(dir, passphrase=passphrase)
    csr = call(server, token, "POST", "/v1/hierarchy/fleet-ca/csr",
               json={"common_name": "Fleet CA"})["csr_pem"]
    with _local_errors():
        cert = ceremony.sign_ca_csr(dir, csr.encode(), passphrase=passphrase, now=_now())
        root_pem = (dir / ceremony.ROOT_CERT).read_text()
    res = call(server, token, "POST", "/v1/hierarchy/fleet-ca/certificate", json={
        "certificate_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "root_pem": root_pem})
    out.print(f"fleet CA {res['fleet_ca_id']} active; root fingerprint {res['root_fingerprint']}")
    err.print(f"[bold yellow]{escape(OFFLINE_NOTE.format(dir=dir))}[/]")


@ca_app.command("show")
def ca_show(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """Show the hierarchy."""
    emit(call(server, token, "GET", "/v1/hierarchy"), as_json,
         ["id", "kind", "name", "parent_id", "status", "key_location", "path_length"])


# --- factories and batches ---------------------------------------------------------------------


@factory_app.command("create")
def factory_create(
    name: str,
    batch_cas: Annotated[bool, typer.Option("--batch-cas", help="allow batch CAs under it")]
    = False,
    external_key: Annotated[bool, typer.Option(
        "--external-key", help="the factory keeps its CA key in its own PKCS#11 token")] = False,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create a factory with its issuing CA and a factory-scoped API token (shown once)."""
    res = call(server, token, "POST", "/v1/factories", json={
        "name": name, "batch_cas": batch_cas,
        "key_location": "external" if external_key else "platform"})
    if as_json:
        emit(res, True)
        return
    out.print(f"factory {res['id']} ({res['status']}), CA {res['ca_id']}")
    out.print(f"factory token (shown once): [bold]{escape(str(res['token']))}[/]")
    if external_key:
        out.print("submit the factory CA's CSR with `fleettrust factory submit-csr`")


@factory_app.command("list")
def factory_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                 as_json: JsonOpt = False) -> None:
    """List factories."""
    emit(call(server, token, "GET", "/v1/factories"), as_json,
         ["id", "name", "status", "key_location", "batch_cas", "ca_id"])


@factory_app.command("show")
def factory_show(factory_id: str, server: ServerOpt = DEFAULT_SERVER,
                 token: TokenOpt = None) -> None:
    """Show one factory (JSON)."""
    emit(call(server, token, "GET", f"/v1/factories/{factory_id}"), True)


@factory_app.command("submit-csr")
def factory_submit_csr(
    factory_id: str,
    csr: Annotated[Path, typer.Option(help="the factory CA's CSR (PEM) from its own token")],
    out_file: Annotated[Path, typer.Option("--out", help="where to write the chain")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Have the fleet CA sign a factory CA whose key stays in the factory's token."""
    res = call(server, token, "POST", f"/v1/factories/{factory_id}/ca-csr",
               json={"csr_pem": _read_text(csr, "CSR")})
    out_file.write_text("".join(res["chain_pem"]))
    out.print(f"factory CA chain written to {escape(str(out_file))}")


@batch_app.command("create")
def batch_create(
    factory_id: str,
    name: Annotated[str, typer.Option()],
    model: Annotated[str, typer.Option("--model", help="product model")],
    hw_rev: Annotated[str, typer.Option("--hw-rev", help="hardware revision")],
    size: Annotated[int, typer.Option("--size", help="planned size", min=1)],
    manufactured_on: Annotated[str | None, typer.Option(help="YYYY-MM-DD (default today)")]
    = None,
    own_ca: Annotated[bool, typer.Option("--own-ca", help="give the batch its own CA")] = False,
    shared_secret: Annotated[bool, typer.Option(
        "--shared-secret", help="constrained devices: group secret instead of certificates")]
    = False,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create a production batch under a factory."""
    day = manufactured_on or _now().date().isoformat()
    res = call(server, token, "POST", f"/v1/factories/{factory_id}/batches", json={
        "name": name, "product_model": model, "hardware_revision": hw_rev,
        "planned_size": size, "manufactured_on": day, "own_ca": own_ca,
        "auth_method": "shared_secret" if shared_secret else "certificate"})
    if as_json:
        emit(res, True)
        return
    out.print(f"batch {res['id']} created (CA {res['ca_id']})")
    if "group_secret" in res:
        out.print(f"group secret (shown once): [bold]{escape(str(res['group_secret']))}[/]")


@batch_app.command("list")
def batch_list(factory_id: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
               as_json: JsonOpt = False) -> None:
    """List the batches of a factory."""
    emit(call(server, token, "GET", f"/v1/factories/{factory_id}/batches"), as_json,
         ["id", "name", "product_model", "hardware_revision", "issued_count", "planned_size",
          "own_ca", "auth_method", "status"])


@batch_app.command("show")
def batch_show(batch_id: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Show one batch (JSON)."""
    emit(call(server, token, "GET", f"/v1/batches/{batch_id}"), True)


# --- devices -----------------------------------------------------------------------------------


def _load_manifest(manifest: Path) -> dict[str, Any]:
    text = _read_text(manifest, "manifest")
    try:
        data = json.loads(text)
    except ValueError as exc:
        fail(f"manifest {manifest} is not JSON: {exc}")
    if not isinstance(data, dict):
        fail(f"manifest {manifest} must hold a JSON object")
    return data


@device_app.command("issue")
def device_issue(
    batch_id: str,
    csr: Annotated[Path, typer.Option(help="device CSR (PEM)")],
    manifest: Annotated[Path, typer.Option(help="hardware manifest (JSON)")],
    out_dir: Annotated[Path, typer.Option("--out-dir", help="where to write cert and chain")],
    device_id: Annotated[str | None, typer.Option()] = None,
    station: Annotated[str | None, typer.Option()] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Issue one device certificate from its CSR and hardware manifest.

    Writes <device-id>.pem, chain.pem (issuing CA first, without the root) and root.pem.
    """
    body = {"csr": _read_text(csr, "CSR"), "manifest": _load_manifest(manifest),
            "device_id": device_id, "station": station}
    res = call(server, token, "POST", f"/v1/batches/{batch_id}/devices", json=body)
    d = res["devices"][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{d['device_id']}.pem").write_text(d["certificate_pem"])
    (out_dir / "chain.pem").write_text("".join(res["chain_pem"]))
    (out_dir / "root.pem").write_text(res["root_pem"])
    out.print(f"device {d['device_id']} serial {d['serial']} -> {escape(str(out_dir))}")
    for f in d["findings"]:
        err.print(f"[yellow]finding {escape(str(f))}[/]: a hardware identifier is already "
                  "claimed by another device")


def _parse_jsonl(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """(file line number, object) for every non-blank line; exit listing the malformed ones."""
    items: list[tuple[int, dict[str, Any]]] = []
    bad: list[tuple[int, str]] = []
    for no, ln in enumerate(_read_text(file, "input").splitlines(), start=1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
        except ValueError as exc:
            bad.append((no, f"not JSON ({exc})"))
            continue
        if not isinstance(obj, dict):
            bad.append((no, "not a JSON object"))
            continue
        items.append((no, obj))
    if bad:
        for no, why in bad[:50]:
            err.print(f"  line {no}: {escape(why)}")
        fail(f"{len(bad)} malformed line(s) in {file}; nothing was sent")
    if not items:
        fail(f"{file} holds no devices")
    return items


def _item_index(e: dict[str, Any]) -> int | None:
    """0-based request item of one error: ``line`` (1-based) or ``body.items.<i>.…``."""
    line = e.get("line")
    if isinstance(line, int):
        return line - 1
    parts = str(e.get("location", "")).split(".")
    if len(parts) >= 3 and parts[:2] == ["body", "items"] and parts[2].isdigit():
        return int(parts[2])
    return None


@device_app.command("issue-bulk")
def device_issue_bulk(
    batch_id: str,
    file: Annotated[Path, typer.Argument(help="JSON lines: {csr, manifest, device_id?, station?}")],
    out_file: Annotated[Path, typer.Option("--out", help="JSON lines of issued certificates")],
    chunk: Annotated[int, typer.Option(min=1, max=10000, help="devices per request")] = 1000,
    chain_out: Annotated[Path | None, typer.Option(
        "--chain-out", help="also write the CA chain (PEM) here")] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Issue many devices from a JSON-lines file, one request per chunk.

    Each request is all-or-nothing: a chunk with a bad line issues nothing and its bad lines
    are reported with their line numbers in FILE. The output has one JSON object per issued
    device: {line, device_id, serial, certificate_pem, findings}.
    """
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from fleettrust.cli.client import ApiError

    items = _parse_jsonl(file)
    issued = rejected = 0
    fatal: ApiError | None = None
    chain: list[str] | None = None
    try:
        fh = out_file.open("w", encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {out_file}: {exc.strerror}")
    with _client(server, token) as client, fh, Progress(
        TextColumn("issuing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TimeRemainingColumn(), console=err,
    ) as progress:
        task = progress.add_task("issue", total=len(items))
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            try:
                res = client.post(f"/v1/batches/{batch_id}/devices/bulk",
                                  json={"items": [o for _, o in part]})
            except ApiError as exc:
                if exc.unreachable or exc.status in (401, 403, 404, 413) or exc.status >= 500:
                    fatal = exc  # the next chunks would fail the same way
                    break
                rejected += len(part)
                err.print(f"[red]file lines {part[0][0]}-{part[-1][0]} rejected, none of them "
                          f"issued:[/] {escape(describe(exc))}")
                errors = exc.errors
                if len(part) == 1 and not any(_item_index(e) is not None for e in errors):
                    # A one-item request is answered with that item's own error.
                    errors = [{"line": 1, "code": exc.code, "message": exc.detail}]
                for e in errors[:50]:
                    idx = _item_index(e)
                    where = f"line {part[idx][0]}" if idx is not None and idx < len(part) \
                        else str(e.get("location", "request"))
                    code = e.get("code", "invalid")
                    err.print(f"  {where}: {escape(str(code))}: "
                              f"{escape(str(e.get('message', '')))}")
            else:
                for (no, _), d in zip(part, res["devices"], strict=True):
                    fh.write(json.dumps({"line": no, **d}) + "\n")
                issued += len(res["devices"])
                chain = res["chain_pem"]
            progress.advance(task, len(part))
    not_sent = len(items) - issued - rejected
    if chain is not None and chain_out is not None:
        chain_out.write_text("".join(chain))
    out.print(f"issued {issued}, rejected {rejected}, not sent {not_sent}; "
              f"results in {escape(str(out_file))}")
    if fatal is not None:
        fail(describe(fatal))
    if rejected or not_sent:
        raise typer.Exit(1)


@device_app.command("generate")
def device_generate(
    batch_id: str,
    manifest: Annotated[Path, typer.Option(help="hardware manifest (JSON)")],
    out_dir: Annotated[Path, typer.Option("--out-dir")],
    passphrase_file: Annotated[Path, typer.Option(
        help="passphrase (12+ characters) protecting the returned key")],
    key_format: Annotated[str, typer.Option("--format", help="pkcs8 or pkcs12")] = "pkcs8",
    device_id: Annotated[str | None, typer.Option()] = None,
    station: Annotated[str | None, typer.Option()] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Server-side key generation for hardware that cannot make a key (marked weaker).

    The key is returned once, encrypted (PKCS#8 PEM or PKCS#12), and written with mode 0600.
    """
    import base64

    if key_format not in ("pkcs8", "pkcs12"):
        fail("--format must be pkcs8 or pkcs12")
    pw = _read_text(passphrase_file, "passphrase file").strip()
    res = call(server, token, "POST", f"/v1/batches/{batch_id}/devices/generate", json={
        "manifest": _load_manifest(manifest), "passphrase": pw, "key_format": key_format,
        "device_id": device_id, "station": station})
    d = res["devices"][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{d['device_id']}.pem").write_text(d["certificate_pem"])
    (out_dir / "chain.pem").write_text("".join(res["chain_pem"]))
    (out_dir / "root.pem").write_text(res["root_pem"])
    if key_format == "pkcs8":
        key_path = out_dir / f"{d['device_id']}.key.pem"
        _write_private(key_path, res["private_key_pem"])
    else:
        key_path = out_dir / f"{d['device_id']}.p12"
        _write_private(key_path, base64.b64decode(res["pkcs12_b64"]))
    out.print(f"device {d['device_id']} issued with a server-generated key -> "
              f"{escape(str(key_path))}")


@device_app.command("show")
def device_show(device_id: str, server: ServerOpt = DEFAULT_SERVER,
                token: TokenOpt = None) -> None:
    """Show one device (JSON)."""
    emit(call(server, token, "GET", f"/v1/devices/{device_id}"), True)


@device_app.command("list")
def device_list(batch_id: Annotated[str | None, typer.Option()] = None,
                limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                as_json: JsonOpt = False) -> None:
    """List devices."""
    params: dict[str, Any] = {"limit": limit}
    if batch_id:
        params["batch_id"] = batch_id
    emit(call(server, token, "GET", "/v1/devices", params=params), as_json,
         ["id", "batch_id", "status", "auth_method", "key_origin", "owner"])


@device_app.command("claim-code")
def device_claim_code(
    device_id: str,
    qr: Annotated[Path | None, typer.Option("--qr", help="write a QR code (.png or .svg)")]
    = None,
    ttl_days: Annotated[int | None, typer.Option(min=1, max=3650)] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Create a single-use claim code (replacing any unused one) and optionally its QR code."""
    if qr is not None and qr.suffix.lower() not in (".png", ".svg"):
        fail("--qr must end in .png or .svg")
    res = call(server, token, "POST", f"/v1/devices/{device_id}/claim-code",
               json={"ttl_days": ttl_days})
    if qr is not None:
        import segno

        try:
            segno.make(res["claim_uri"], error="m").save(str(qr), scale=8, border=4)
        except OSError as exc:
            fail(f"cannot write {qr}: {exc.strerror}")
        out.print(f"QR code written to {escape(str(qr))}")
    out.print(f"claim code (shown once): [bold]{escape(str(res['code']))}[/] "
              f"(expires {res['expires_at']})")


@device_app.command("revoke-claim-code")
def device_revoke_claim_code(device_id: str, server: ServerOpt = DEFAULT_SERVER,
                             token: TokenOpt = None) -> None:
    """Revoke a device's unused claim code."""
    res = call(server, token, "DELETE", f"/v1/devices/{device_id}/claim-code")
    out.print(f"revoked {res['revoked']} claim code(s)")


@device_app.command("claim")
def device_claim(code: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Claim a device with its code (device-owner token)."""
    res = call(server, token, "POST", "/v1/claims", json={"code": code})
    out.print(f"device {res['device_id']} now belongs to {escape(str(res['owner']))}")


# --- tokens and audit --------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="admin, factory, repair-centre, release-manager, "
                                           "auditor or device-owner")],
    subject: Annotated[str, typer.Option(help="who holds it (a person, station or account)")],
    factory_id: Annotated[str | None, typer.Option(help="scope of a factory token")] = None,
    ttl_days: Annotated[int | None, typer.Option(min=1, max=3650)] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Create an API token (shown once)."""
    res = call(server, token, "POST", "/v1/tokens", json={
        "role": role, "subject": subject, "factory_id": factory_id, "ttl_days": ttl_days})
    if as_json:
        emit(res, True)
        return
    out.print(f"token {res['id']} ({escape(role)}) — shown once: "
              f"[bold]{escape(str(res['token']))}[/]")


@token_app.command("list")
def token_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
               as_json: JsonOpt = False) -> None:
    """List API tokens (never their secrets)."""
    emit(call(server, token, "GET", "/v1/tokens"), as_json,
         ["id", "role", "subject", "factory_id", "expires_at", "revoked"])


@token_app.command("revoke")
def token_revoke(token_id: str, server: ServerOpt = DEFAULT_SERVER,
                 token: TokenOpt = None) -> None:
    """Revoke an API token."""
    call(server, token, "DELETE", f"/v1/tokens/{token_id}")
    out.print(f"token {token_id} revoked")


@app.command("audit")
def audit_list(target: Annotated[str | None, typer.Option()] = None,
               limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
               server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
               as_json: JsonOpt = False) -> None:
    """List audit events."""
    params: dict[str, Any] = {"limit": limit}
    if target:
        params["target_id"] = target
    emit(call(server, token, "GET", "/v1/audit", params=params), as_json,
         ["id", "occurred_at", "actor", "action", "target_type", "target_id"])


@app.command("findings")
def findings_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """List open findings."""
    emit(call(server, token, "GET", "/v1/findings"), as_json,
         ["id", "kind", "severity", "reason_code", "device_id", "created_at"])


# --- the device agent and the fleet simulator (their own module; commands import lazily).
app.add_typer(agent_app, name="agent")
app.command("simulate")(simulate)
app.add_typer(log_app, name="log")
device_app.command("history")(device_history)
app.add_typer(mosquitto_app, name="mosquitto")
app.add_typer(revoke_app, name="revoke")
ca_app.command("root-crl")(ca_root_crl)


def main() -> None:  # pragma: no cover
    app()
