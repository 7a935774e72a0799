"""Typer commands. Thin: local commands call services/ceremony, the rest call the HTTP API."""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from fleettrust.cli.client import ApiError, Client
from fleettrust.errors import FleetTrustError

app = typer.Typer(no_args_is_help=True, help="fleettrust: trust for an IoT fleet.",
                  pretty_exceptions_enable=False)
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

out = Console()
err = Console(stderr=True)

ServerOpt = Annotated[str, typer.Option("--server", envvar="FLEETTRUST_SERVER",
                                        help="API base URL")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="FLEETTRUST_TOKEN",
                                              help="API token", show_default=False)]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", envvar="FLEETTRUST_DATA_DIR",
                                                 help="server data directory")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of a table")]
DEFAULT_SERVER = "http://127.0.0.1:8080"


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _client(server: str, token: str | None) -> Client:
    if not token:
        fail("no API token: pass --token or set FLEETTRUST_TOKEN", 2)
    return Client(server, token)


def call(server: str, token: str | None, method: str, path: str, **kw: Any) -> Any:
    client = _client(server, token)
    try:
        return client.request(method, path, **kw)
    except ApiError as exc:
        for e in exc.errors[:20]:
            where = e.get("line", e.get("location", ""))
            err.print(f"  line {where}: {e.get('code', '')} {e.get('message', '')}",
                      highlight=False)
        fail(f"{exc.detail} ({exc.code}, HTTP {exc.status})")
    finally:
        client.close()


def emit(data: Any, as_json: bool, columns: list[str] | None = None) -> None:
    if as_json or columns is None:
        out.print_json(json.dumps(data, default=str))
        return
    rows = data if isinstance(data, list) else [data]
    table = Table(*columns)
    for r in rows:
        table.add_row(*[str(r.get(c, "")) for c in columns])
    out.print(table)


def _read_secret(file: Path | None, env: str, prompt: str, confirm: bool) -> bytes:
    if file is not None:
        try:
            value = file.read_text().strip()
        except OSError as exc:
            fail(f"cannot read {file}: {exc.strerror}")
        if not value:
            fail(f"{file} is empty")
        return value.encode()
    if os.environ.get(env):
        return os.environ[env].encode()
    if not sys.stdin.isatty():
        fail(f"no passphrase: use --passphrase-file or set {env}")
    return str(typer.prompt(prompt, hide_input=True, confirmation_prompt=confirm)).encode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- local: init, serve, db --------------------------------------------------------------------


@app.command()
def init(data_dir: DataDirOpt = None,
         database_url: Annotated[str | None, typer.Option(envvar="FLEETTRUST_DATABASE_URL")] = None
         ) -> None:
    """Create the data directory, migrate the database and print the first admin token."""
    from fleettrust.config import Settings
    from fleettrust.services.bootstrap import initialize

    settings = Settings.load(data_dir=data_dir, database_url=database_url)
    result = initialize(settings)
    out.print(f"data directory: {settings.data_dir}")
    if result.admin_token:
        out.print(f"first admin token (shown once): [bold]{result.admin_token}[/]")
    else:
        out.print("an admin token already exists; none created")


@app.command()
def serve(
    data_dir: DataDirOpt = None,
    host: Annotated[str | None, typer.Option(envvar="FLEETTRUST_HOST")] = None,
    port: Annotated[int | None, typer.Option(envvar="FLEETTRUST_PORT")] = None,
    database_url: Annotated[str | None, typer.Option(envvar="FLEETTRUST_DATABASE_URL")] = None,
    workers: Annotated[int, typer.Option(min=1, max=32)] = 1,
) -> None:
    """Run the API server (migrates the database; prints a first admin token on a fresh one)."""
    from fleettrust.api.server import run_server
    from fleettrust.config import Settings
    from fleettrust.services.bootstrap import initialize

    settings = Settings.load(data_dir=data_dir, database_url=database_url, host=host, port=port)
    result = initialize(settings)
    out.print(f"fleettrust API listening on http://{settings.host}:{settings.port}")
    if result.admin_token:
        out.print(f"first admin token (shown once): [bold]{result.admin_token}[/]")
    sys.stdout.flush()
    run_server(settings, workers=workers)


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDirOpt = None,
               database_url: Annotated[str | None,
                                       typer.Option(envvar="FLEETTRUST_DATABASE_URL")] = None
               ) -> None:
    """Apply database migrations."""
    from fleettrust.config import Settings
    from fleettrust.storage.db import make_engine
    from fleettrust.storage.migrate import current_revision, upgrade

    settings = Settings.load(data_dir=data_dir, database_url=database_url)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    out.print(f"database at revision {current_revision(engine)}")


# --- the offline ceremony ----------------------------------------------------------------------


RootDirOpt = Annotated[Path, typer.Option("--dir", help="offline root CA directory")]
PassFileOpt = Annotated[Path | None, typer.Option("--passphrase-file",
                                                  help="file holding the root passphrase")]


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
    try:
        info = ceremony.init_root(dir, passphrase=passphrase, now=_now(), common_name=common_name,
                                  organization=organization, algorithm=alg,
                                  validity_days=validity_days, pkcs11=cfg)
    except FleetTrustError as exc:
        fail(exc.message)
    out.print(f"root CA created in {info.directory} (key: {info.key_backend})")
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
    from cryptography.hazmat.primitives import serialization

    from fleettrust import ceremony, pki

    meta_file = dir / ceremony.ROOT_META
    is_pkcs11 = meta_file.exists() and json.loads(meta_file.read_text()).get(
        "key_backend") == "pkcs11"
    passphrase = pin = None
    if is_pkcs11:
        pin = _read_secret(None, "FLEETTRUST_PKCS11_PIN", "Token PIN", False).decode()
    else:
        passphrase = _read_secret(passphrase_file, "FLEETTRUST_ROOT_PASSPHRASE",
                                  "Root key passphrase", False)
    try:
        cert = ceremony.sign_ca_csr(dir, csr.read_bytes(), passphrase=passphrase, now=_now(),
                                    path_length=path_length, validity_days=validity_days,
                                    pkcs11_pin=pin)
    except FleetTrustError as exc:
        fail(exc.message)
    except OSError as exc:
        fail(f"cannot read {csr}: {exc.strerror}")
    out_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.print(f"signed {cert.subject.rfc4514_string()} -> {out_file}")
    out.print(f"SHA-256 fingerprint: {pki.fingerprint_sha256(cert)}")


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
    out.print(f"fleet CA CSR written to {out_file}; sign it offline with `fleettrust ca sign`")


@ca_app.command("import-fleet")
def ca_import_fleet(
    certificate: Annotated[Path, typer.Argument(help="signed fleet CA certificate (PEM)")],
    root: Annotated[Path, typer.Option(help="the root certificate (PEM, public)")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Import the signed fleet CA certificate and the (public) root certificate."""
    res = call(server, token, "POST", "/v1/hierarchy/fleet-ca/certificate",
               json={"certificate_pem": certificate.read_text(), "root_pem": root.read_text()})
    out.print(f"fleet CA {res['fleet_ca_id']} active; root fingerprint {res['root_fingerprint']}")


@ca_app.command("bootstrap")
def ca_bootstrap(
    dir: RootDirOpt,
    passphrase_file: PassFileOpt = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Quickstart convenience: init-root (if absent), fleet CSR, offline sign, import.

    Runs in this CLI process, not in the server: the server never sees the root key.
    """
    from cryptography.hazmat.primitives import serialization

    from fleettrust import ceremony

    passphrase = _read_secret(passphrase_file, "FLEETTRUST_ROOT_PASSPHRASE",
                              "Root key passphrase", True)
    if not (dir / ceremony.ROOT_CERT).exists():
        info = ceremony.init_root(dir, passphrase=passphrase, now=_now())
        out.print(f"root CA created in {dir}; SHA-256 fingerprint {info.fingerprint}")
    csr = call(server, token, "POST", "/v1/hierarchy/fleet-ca/csr",
               json={"common_name": "Fleet CA"})["csr_pem"]
    try:
        cert = ceremony.sign_ca_csr(dir, csr.encode(), passphrase=passphrase, now=_now())
    except FleetTrustError as exc:
        fail(exc.message)
    res = call(server, token, "POST", "/v1/hierarchy/fleet-ca/certificate", json={
        "certificate_pem": cert.public_bytes(serialization.Encoding.PEM).decode(),
        "root_pem": (dir / ceremony.ROOT_CERT).read_text()})
    out.print(f"fleet CA {res['fleet_ca_id']} active; root fingerprint {res['root_fingerprint']}")


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
    out.print(f"factory token (shown once): [bold]{res['token']}[/]")


@factory_app.command("list")
def factory_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                 as_json: JsonOpt = False) -> None:
    emit(call(server, token, "GET", "/v1/factories"), as_json,
         ["id", "name", "status", "key_location", "batch_cas", "ca_id"])


@factory_app.command("submit-csr")
def factory_submit_csr(
    factory_id: str,
    csr: Annotated[Path, typer.Option(help="the factory CA's CSR (PEM) from its own token")],
    out_file: Annotated[Path, typer.Option("--out", help="where to write the chain")],
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Have the fleet CA sign a factory CA whose key stays in the factory's token."""
    res = call(server, token, "POST", f"/v1/factories/{factory_id}/ca-csr",
               json={"csr_pem": csr.read_text()})
    out_file.write_text("".join(res["chain_pem"]))
    out.print(f"factory CA chain written to {out_file}")


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
        out.print(f"group secret (shown once): [bold]{res['group_secret']}[/]")


@batch_app.command("list")
def batch_list(factory_id: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
               as_json: JsonOpt = False) -> None:
    emit(call(server, token, "GET", f"/v1/factories/{factory_id}/batches"), as_json,
         ["id", "name", "product_model", "hardware_revision", "issued_count", "planned_size",
          "own_ca", "auth_method", "status"])


@batch_app.command("show")
def batch_show(batch_id: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    emit(call(server, token, "GET", f"/v1/batches/{batch_id}"), True)


# --- devices -----------------------------------------------------------------------------------


def _load_manifest(manifest: Path) -> dict[str, Any]:
    try:
        data = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        fail(f"cannot read manifest {manifest}: {exc}")
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
    """Issue one device certificate from its CSR and hardware manifest."""
    body = {"csr": csr.read_text(), "manifest": _load_manifest(manifest),
            "device_id": device_id, "station": station}
    res = call(server, token, "POST", f"/v1/batches/{batch_id}/devices", json=body)
    d = res["devices"][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{d['device_id']}.pem").write_text(d["certificate_pem"])
    (out_dir / "chain.pem").write_text("".join(res["chain_pem"]))
    (out_dir / "root.pem").write_text(res["root_pem"])
    out.print(f"device {d['device_id']} serial {d['serial']} -> {out_dir}")
    for f in d["findings"]:
        err.print(f"[yellow]finding {f}[/]: a hardware identifier is claimed by another device")


@device_app.command("issue-bulk")
def device_issue_bulk(
    batch_id: str,
    file: Annotated[Path, typer.Argument(help="JSON lines: {csr, manifest, device_id?, station?}")],
    out_file: Annotated[Path, typer.Option("--out", help="JSON lines of issued certificates")],
    chunk: Annotated[int, typer.Option(min=1, max=10000, help="devices per request")] = 1000,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Issue many devices from a JSON-lines file; each request is all-or-nothing."""
    try:
        lines = [ln for ln in file.read_text().splitlines()]
    except OSError as exc:
        fail(f"cannot read {file}: {exc.strerror}")
    items: list[tuple[int, dict[str, Any]]] = []
    bad = 0
    for no, ln in enumerate(lines, start=1):
        if not ln.strip():
            continue
        try:
            obj = json.loads(ln)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            items.append((no, obj))
        except ValueError as exc:
            bad += 1
            err.print(f"  line {no}: not a JSON object ({exc})")
    if bad:
        fail(f"{bad} malformed lines in {file}; nothing was sent")
    if not items:
        fail(f"{file} holds no devices")
    client = _client(server, token)
    issued = failed = 0
    with out_file.open("w") as fh, Progress(
        TextColumn("issuing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=err,
    ) as progress:
        task = progress.add_task("issue", total=len(items))
        for start in range(0, len(items), chunk):
            part = items[start:start + chunk]
            try:
                res = client.post(f"/v1/batches/{batch_id}/devices/bulk",
                                  json={"items": [o for _, o in part]})
            except ApiError as exc:
                failed += len(part)
                err.print(f"[red]request for file lines {part[0][0]}-{part[-1][0]} rejected:[/]"
                          f" {exc.detail}")
                for e in exc.errors:
                    if "line" in e:
                        err.print(f"  line {part[e['line'] - 1][0]}: {e['code']}: {e['message']}")
                if exc.status in (0, 401, 403, 404):
                    break
            else:
                for d in res["devices"]:
                    fh.write(json.dumps(d) + "\n")
                issued += len(res["devices"])
            progress.advance(task, len(part))
    client.close()
    out.print(f"issued {issued}, rejected {failed}; results in {out_file}")
    if failed:
        raise typer.Exit(1)


@device_app.command("generate")
def device_generate(
    batch_id: str,
    manifest: Annotated[Path, typer.Option(help="hardware manifest (JSON)")],
    out_dir: Annotated[Path, typer.Option("--out-dir")],
    passphrase_file: Annotated[Path, typer.Option(help="passphrase protecting the returned key")],
    key_format: Annotated[str, typer.Option("--format", help="pkcs8 or pkcs12")] = "pkcs8",
    device_id: Annotated[str | None, typer.Option()] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    """Server-side key generation for hardware that cannot make a key (marked weaker)."""
    import base64

    pw = passphrase_file.read_text().strip()
    res = call(server, token, "POST", f"/v1/batches/{batch_id}/devices/generate", json={
        "manifest": _load_manifest(manifest), "passphrase": pw, "key_format": key_format,
        "device_id": device_id})
    d = res["devices"][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{d['device_id']}.pem").write_text(d["certificate_pem"])
    (out_dir / "chain.pem").write_text("".join(res["chain_pem"]))
    if key_format == "pkcs8":
        key_path = out_dir / f"{d['device_id']}.key.pem"
        key_path.write_text(res["private_key_pem"])
    else:
        key_path = out_dir / f"{d['device_id']}.p12"
        key_path.write_bytes(base64.b64decode(res["pkcs12_b64"]))
    key_path.chmod(0o600)
    out.print(f"device {d['device_id']} issued with a server-generated key -> {key_path}")


@device_app.command("show")
def device_show(device_id: str, server: ServerOpt = DEFAULT_SERVER,
                token: TokenOpt = None) -> None:
    emit(call(server, token, "GET", f"/v1/devices/{device_id}"), True)


@device_app.command("list")
def device_list(batch_id: Annotated[str | None, typer.Option()] = None,
                limit: Annotated[int, typer.Option(min=1, max=1000)] = 100,
                server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
                as_json: JsonOpt = False) -> None:
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

        segno.make(res["claim_uri"], error="m").save(str(qr), scale=8, border=4)
        out.print(f"QR code written to {qr}")
    out.print(f"claim code (shown once): [bold]{res['code']}[/] (expires {res['expires_at']})")


@device_app.command("revoke-claim-code")
def device_revoke_claim_code(device_id: str, server: ServerOpt = DEFAULT_SERVER,
                             token: TokenOpt = None) -> None:
    res = call(server, token, "DELETE", f"/v1/devices/{device_id}/claim-code")
    out.print(f"revoked {res['revoked']} claim code(s)")


@device_app.command("claim")
def device_claim(code: str, server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Claim a device with its code (device-owner token)."""
    res = call(server, token, "POST", "/v1/claims", json={"code": code})
    out.print(f"device {res['device_id']} now belongs to {res['owner']}")


# --- tokens and audit --------------------------------------------------------------------------


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option()],
    subject: Annotated[str, typer.Option()],
    factory_id: Annotated[str | None, typer.Option()] = None,
    ttl_days: Annotated[int | None, typer.Option(min=1, max=3650)] = None,
    server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
) -> None:
    res = call(server, token, "POST", "/v1/tokens", json={
        "role": role, "subject": subject, "factory_id": factory_id, "ttl_days": ttl_days})
    out.print(f"token {res['id']} ({role}) — shown once: [bold]{res['token']}[/]")


@token_app.command("list")
def token_list(server: ServerOpt = DEFAULT_SERVER, token: TokenOpt = None,
               as_json: JsonOpt = False) -> None:
    emit(call(server, token, "GET", "/v1/tokens"), as_json,
         ["id", "role", "subject", "factory_id", "expires_at", "revoked"])


@token_app.command("revoke")
def token_revoke(token_id: str, server: ServerOpt = DEFAULT_SERVER,
                 token: TokenOpt = None) -> None:
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


def main() -> None:  # pragma: no cover
    app()
