"""``fleettrust revoke …``: revoke devices, batches, factories (breach windows), suspend and
release devices, preview counts; and the offline ``ca root-crl`` ceremony command.

Thin: every revocation command is an HTTP call to ``fleettrust serve`` (``--server``/``--token``
or ``FLEETTRUST_SERVER``/``FLEETTRUST_TOKEN``). ``ca_root_crl`` runs on the offline root machine
and never talks to the server; upload its output with ``fleettrust revoke upload-root-crl``.

Registered by ``fleettrust.cli.main``: ``app.add_typer(revoke_app, name="revoke")`` and
``ca_app.command("root-crl")(ca_root_crl)``.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated, Any

import typer

revoke_app = typer.Typer(no_args_is_help=True,
                         help="Revocation: devices, batches, factories, breach windows, holds.")

_DEFAULT_SERVER = "http://127.0.0.1:8080"
ServerOpt = Annotated[str, typer.Option("--server", envvar="FLEETTRUST_SERVER",
                                        help="API base URL")]
TokenOpt = Annotated[str | None, typer.Option("--token", envvar="FLEETTRUST_TOKEN",
                                              help="API token", show_default=False)]
ReasonOpt = Annotated[str, typer.Option(
    "--reason", help="RFC 5280 reason: unspecified, keyCompromise, cACompromise, "
                     "affiliationChanged, superseded, cessationOfOperation, "
                     "privilegeWithdrawn, aACompromise")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON instead of text")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]


def _main() -> Any:
    from fleettrust.cli import main  # late: main registers this module

    return main


def _time(value: str | None, what: str) -> str | None:
    """An RFC 3339 instant with a zone (the window is [after, before) in UTC)."""
    if value is None:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _main().fail(f"{what} must be an RFC 3339 date-time, e.g. 2026-11-24T14:00:00Z")
    if parsed.tzinfo is None:
        _main().fail(f"{what} needs a time zone (Z or +hh:mm)")
    return parsed.isoformat()


def _show(result: dict[str, Any], as_json: bool, what: str) -> None:
    m = _main()
    if as_json:
        m.out.print_json(json.dumps(result))
        return
    m.out.print(f"{what}: operation {result['operation_id']} — {result['newly_revoked']} of "
                f"{result['covered']} certificate(s) changed"
                + (f"; CAs revoked: {', '.join(result['ca_ids_revoked'])}"
                   if result.get("ca_ids_revoked") else "")
                + (" (per-certificate rows still being written)"
                   if result.get("state") == "pending" else ""))


def _confirm(server: str, token: str | None, scope: str, target: str, yes: bool,
             after: str | None = None, before: str | None = None) -> None:
    if yes:
        return
    m = _main()
    params = {"scope": scope, "target_id": target}
    if after:
        params["issued_after"] = after
    if before:
        params["issued_before"] = before
    p = m.call(server, token, "GET", "/v1/revocation/preview", params=params)
    cas = f", CAs {', '.join(p['ca_ids'])}" if p["ca_ids"] else ""
    typer.confirm(f"revoke {p['would_revoke']} certificate(s) of {p['covered']} in scope "
                  f"({p['devices']} device(s){cas})?", abort=True, err=True)


@revoke_app.command("device")
def revoke_device(device_id: str, reason: ReasonOpt = "unspecified",
                  server: ServerOpt = _DEFAULT_SERVER, token: TokenOpt = None,
                  as_json: JsonOpt = False) -> None:
    """Revoke every certificate of one device."""
    res = _main().call(server, token, "POST", f"/v1/revocation/devices/{device_id}",
                       json={"reason": reason})
    _show(res, as_json, f"device {device_id}")


@revoke_app.command("batch")
def revoke_batch(batch_id: str, reason: ReasonOpt = "unspecified", yes: YesOpt = False,
                 server: ServerOpt = _DEFAULT_SERVER, token: TokenOpt = None,
                 as_json: JsonOpt = False) -> None:
    """Revoke a production batch (and its own CA, if it has one)."""
    _confirm(server, token, "batch", batch_id, yes or as_json)
    res = _main().call(server, token, "POST", f"/v1/revocation/batches/{batch_id}",
                       json={"reason": reason})
    _show(res, as_json, f"batch {batch_id}")


@revoke_app.command("factory")
def revoke_factory(
    factory_id: str, reason: ReasonOpt = "unspecified",
    issued_after: Annotated[str | None, typer.Option(
        "--issued-after", help="breach window start (inclusive), RFC 3339")] = None,
    issued_before: Annotated[str | None, typer.Option(
        "--issued-before", help="breach window end (exclusive), RFC 3339")] = None,
    yes: YesOpt = False, server: ServerOpt = _DEFAULT_SERVER, token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a whole factory (its CAs and devices) or, with a window, only the device
    certificates it issued in [--issued-after, --issued-before)."""
    after = _time(issued_after, "--issued-after")
    before = _time(issued_before, "--issued-before")
    _confirm(server, token, "factory", factory_id, yes or as_json, after, before)
    body: dict[str, Any] = {"reason": reason}
    if after:
        body["issued_after"] = after
    if before:
        body["issued_before"] = before
    res = _main().call(server, token, "POST", f"/v1/revocation/factories/{factory_id}",
                       json=body)
    _show(res, as_json, f"factory {factory_id}")


@revoke_app.command("suspend")
def suspend(device_id: str, server: ServerOpt = _DEFAULT_SERVER, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """Put a device's certificates on hold (certificateHold); `release` lifts it."""
    res = _main().call(server, token, "POST", f"/v1/revocation/devices/{device_id}/suspend",
                       json={})
    _show(res, as_json, f"device {device_id} suspended")


@revoke_app.command("release")
def release(device_id: str, server: ServerOpt = _DEFAULT_SERVER, token: TokenOpt = None,
            as_json: JsonOpt = False) -> None:
    """Lift a device's certificateHold (the entries leave the CRLs)."""
    res = _main().call(server, token, "POST", f"/v1/revocation/devices/{device_id}/release",
                       json={})
    _show(res, as_json, f"device {device_id} released")


@revoke_app.command("preview")
def preview(
    scope: Annotated[str, typer.Argument(help="device, batch or factory")],
    target_id: str,
    issued_after: Annotated[str | None, typer.Option("--issued-after")] = None,
    issued_before: Annotated[str | None, typer.Option("--issued-before")] = None,
    server: ServerOpt = _DEFAULT_SERVER, token: TokenOpt = None, as_json: JsonOpt = False,
) -> None:
    """Count what a revocation would cover, without revoking anything."""
    params = {"scope": scope, "target_id": target_id}
    after = _time(issued_after, "--issued-after")
    before = _time(issued_before, "--issued-before")
    if after:
        params["issued_after"] = after
    if before:
        params["issued_before"] = before
    m = _main()
    p = m.call(server, token, "GET", "/v1/revocation/preview", params=params)
    if as_json:
        m.out.print_json(json.dumps(p))
        return
    m.out.print(f"{p['scope']} {p['target_id']}: {p['covered']} certificate(s) in scope, "
                f"{p['already_revoked']} already revoked, {p['on_hold']} on hold, "
                f"{p['would_revoke']} would be revoked; {p['devices']} device(s)"
                + (f"; CAs: {', '.join(p['ca_ids'])}" if p["ca_ids"] else ""))


@revoke_app.command("status")
def status(operation_id: str, server: ServerOpt = _DEFAULT_SERVER, token: TokenOpt = None) -> None:
    """Show one revocation operation (state, counts, feed positions)."""
    m = _main()
    m.out.print_json(json.dumps(m.call(server, token, "GET",
                                       f"/v1/revocation/operations/{operation_id}")))


@revoke_app.command("upload-root-crl")
def upload_root_crl(crl_file: Path, server: ServerOpt = _DEFAULT_SERVER,
                    token: TokenOpt = None) -> None:
    """Upload the root's CRL signed offline (`fleettrust ca root-crl`) for the server to serve."""
    import base64

    m = _main()
    data = crl_file.read_bytes()
    text = data.decode() if data.lstrip().startswith(b"-----") else base64.b64encode(
        data).decode()
    res = m.call(server, token, "POST", "/v1/crl/root", json={"crl": text})
    m.out.print(f"root CRL number {res['crl_number']} stored; served at {res['url']}")


def ca_root_crl(
    dir: Annotated[Path, typer.Option("--dir", help="offline root CA directory")],
    out_file: Annotated[Path, typer.Option("--out", help="where to write the CRL (DER)")],
    revoke_serial: Annotated[list[str] | None, typer.Option(
        "--revoke-serial", help="hex serial of a fleet CA certificate to revoke (repeatable)")]
    = None,
    reason: ReasonOpt = "keyCompromise",
    validity_days: Annotated[int, typer.Option(min=1, max=3650)] = 180,
    passphrase_file: Annotated[Path | None, typer.Option(
        "--passphrase-file", help="file holding the root key passphrase "
                                  "(else $FLEETTRUST_ROOT_PASSPHRASE, else a prompt)")] = None,
) -> None:
    """Sign the root's CRL (offline): what it revoked so far plus --revoke-serial."""
    m = _main()
    serials: list[tuple[int, str]] = []
    for s in revoke_serial or []:
        try:
            serials.append((int(s.lower().removeprefix("0x").replace(":", ""), 16), reason))
        except ValueError:
            m.fail(f"--revoke-serial {s!r} is not a hex serial number")
    with m._local_errors():
        from cryptography.hazmat.primitives import serialization

        from fleettrust import ceremony

        meta = dir / ceremony.ROOT_META
        pin = passphrase = None
        if meta.exists() and json.loads(meta.read_text()).get("key_backend") == "pkcs11":
            pin = m._read_secret(None, "FLEETTRUST_PKCS11_PIN", "Token PIN", False).decode()
        else:
            passphrase = m._read_secret(passphrase_file, "FLEETTRUST_ROOT_PASSPHRASE",
                                        "Root key passphrase", False)
        crl = ceremony.root_crl(dir, passphrase=passphrase, now=m._now(), revoke=serials,
                                validity_days=validity_days, pkcs11_pin=pin)
        out_file.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    from cryptography import x509

    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    m.out.print(f"root CRL number {number} with {len(list(crl))} entr"
                f"{'y' if len(list(crl)) == 1 else 'ies'} -> {out_file}")


__all__ = ["ca_root_crl", "revoke_app"]
