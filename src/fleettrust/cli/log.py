"""``fleettrust log …`` (verify and fetch) and ``fleettrust device history ID``.

* ``log verify`` works **offline** with nothing but the log's public key (PEM): it checks a
  signed tree head's signature, an entry's inclusion proof against it (``--inclusion`` with
  ``--entry``), a consistency proof from an older tree head (``--consistency`` with
  ``--old-sth``; two heads of the same size need no proof: different roots are a fork), and a
  full download of entries (``--entries``: the leaves rebuild the signed root). Every failure
  prints one precise line ``error: <what> (<code>)`` and exits 1; bad usage or unreadable files
  exit 2; success prints ``OK: …`` lines and exits 0.
* ``log fetch WHAT`` downloads what ``verify`` reads: ``sth``, ``public-key``, ``inclusion``,
  ``consistency``, ``entry``, ``entries`` (public reads need no token; entries do).
* :func:`device_history` (registered by ``cli.main`` as ``device history``) prints a device's
  story from the log and checks every inclusion proof and the tree head's signature locally.

The commands hold no policy and no database access: the server decides what it serves, this
module only verifies. ``log_app`` is registered in ``cli.main`` as ``log``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.markup import escape

from fleettrust.cli.common import DEFAULT_SERVER, ServerOpt, TokenOpt, make_console

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleettrust.ledger.sth import SignedTreeHead

log_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                      help="The transparency log: verify offline, fetch tree heads and proofs.")



_out = make_console(stderr=False)
_err = make_console(stderr=True)

EXIT_INVALID = 1
EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_INVALID) -> NoReturn:
    _err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(code)


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        _fail(f"cannot read {what} {path}: {exc.strerror or exc}", EXIT_USAGE)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(f"{what} {path} is not JSON: {exc}", EXIT_USAGE)


def _load_key(path: Path) -> ec.EllipticCurvePublicKey:
    from fleettrust.ledger.sth import TreeHeadError, load_public_key

    try:
        return load_public_key(path.read_bytes())
    except OSError as exc:
        _fail(f"cannot read public key {path}: {exc.strerror or exc}", EXIT_USAGE)
    except TreeHeadError as exc:
        _fail(f"{path}: {exc} ({exc.code})", EXIT_USAGE)


def _load_sth(path: Path, what: str) -> SignedTreeHead:
    from fleettrust.ledger.sth import SignedTreeHead, TreeHeadError

    try:
        return SignedTreeHead.from_json(_read_json(path, what), what)
    except TreeHeadError as exc:
        _fail(f"{path}: {exc} (malformed)")


def _describe_entry(entry: dict[str, Any]) -> str:
    if entry.get("kind") == "gap":
        return f"gap: audit ids {entry.get('first_id')}..{entry.get('last_id')} never committed"
    ev = entry.get("event", {})
    certs = entry.get("certificates", [])
    extra = f", {len(certs)} certificate(s)" if certs else ""
    return (f"audit event {ev.get('id')}: {ev.get('action')} on {ev.get('target_type')} "
            f"{ev.get('target_id')} by {ev.get('actor')} at {ev.get('occurred_at')}{extra}")


@log_app.command("verify")
def verify(
    sth: Annotated[Path, typer.Option("--sth", dir_okay=False, help="signed tree head (JSON)")],
    public_key: Annotated[Path, typer.Option("--public-key", dir_okay=False,
                                             help="the log's public key (PEM)")],
    inclusion: Annotated[Path | None, typer.Option(
        "--inclusion", dir_okay=False, help="inclusion proof (JSON); needs --entry",
        show_default=False)] = None,
    entry: Annotated[Path | None, typer.Option(
        "--entry", dir_okay=False, help="the log entry the proof is about (JSON)",
        show_default=False)] = None,
    consistency: Annotated[Path | None, typer.Option(
        "--consistency", dir_okay=False, help="consistency proof (JSON); needs --old-sth",
        show_default=False)] = None,
    old_sth: Annotated[Path | None, typer.Option(
        "--old-sth", dir_okay=False, help="an older signed tree head (JSON)",
        show_default=False)] = None,
    entries_file: Annotated[Path | None, typer.Option(
        "--entries", dir_okay=False, help="every entry 0..tree_size-1 (JSON list)",
        show_default=False)] = None,
) -> None:
    """Verify tree heads and proofs offline, with only the log's public key."""
    from fleettrust.ledger import verify as lv
    from fleettrust.ledger.sth import ConsistencyProof, InclusionProof, TreeHeadError

    if (inclusion is None) != (entry is None):
        _fail("--inclusion and --entry go together", EXIT_USAGE)
    if consistency is not None and old_sth is None:
        _fail("--consistency needs --old-sth", EXIT_USAGE)
    key = _load_key(public_key)
    head = _load_sth(sth, "STH")
    try:
        lv.check_sth(head, key)
        _out.print(f"OK: STH of size {head.tree_size} (timestamp {head.timestamp}, root "
                   f"{head.root_hash.hex()}) is signed by log {head.log_id.hex()}")
        if inclusion is not None and entry is not None:
            proof = InclusionProof.from_json(_read_json(inclusion, "inclusion proof"))
            got = lv.verify_inclusion(head, proof, _read_json(entry, "entry"), key)
            _out.print(f"OK: leaf {got.leaf_index} ({escape(_describe_entry(got.entry))}) is in "
                       f"the tree of size {head.tree_size}")
        if old_sth is not None:
            old = _load_sth(old_sth, "old STH")
            cproof = (ConsistencyProof.from_json(_read_json(consistency, "consistency proof"))
                      if consistency is not None else None)
            lv.verify_consistency(old, head, cproof, key)
            _out.print(f"OK: the tree of size {head.tree_size} extends the tree of size "
                       f"{old.tree_size} (append-only, no fork)")
        if entries_file is not None:
            docs = _read_json(entries_file, "entries")
            if not isinstance(docs, list):
                _fail(f"{entries_file} must hold a JSON list of entries", EXIT_USAGE)
            lv.verify_entries(head, docs, key)
            _out.print(f"OK: the {head.tree_size} entries rebuild the signed root")
    except lv.LogVerificationError as exc:
        _fail(f"{exc.message} ({exc.code})")
    except TreeHeadError as exc:
        _fail(f"{exc} (malformed)")


@log_app.command("fetch")
def fetch(
    what: Annotated[str, typer.Argument(
        help="sth | public-key | inclusion | consistency | entry | entries")],
    out: Annotated[Path | None, typer.Option(dir_okay=False, show_default=False,
                                             help="write here instead of stdout")] = None,
    leaf_index: Annotated[int | None, typer.Option(min=0, show_default=False)] = None,
    leaf_hash: Annotated[str | None, typer.Option(help="hex or base64",
                                                  show_default=False)] = None,
    serial: Annotated[str | None, typer.Option(help="certificate serial (hex)",
                                               show_default=False)] = None,
    tree_size: Annotated[int | None, typer.Option(
        min=0, show_default=False, help="for sth / inclusion; default: the latest")] = None,
    first: Annotated[int | None, typer.Option(min=0, show_default=False)] = None,
    second: Annotated[int | None, typer.Option(min=0, show_default=False)] = None,
    start: Annotated[int, typer.Option(min=0, help="entries: first leaf")] = 0,
    end: Annotated[int | None, typer.Option(
        min=0, show_default=False, help="entries: last leaf (default: the latest STH's)")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
) -> None:
    """Download a tree head, the public key, a proof or entries (to --out, or stdout)."""
    from fleettrust.cli.client import ApiError, Client

    params: dict[str, Any]
    try:
        with Client(server, token) as client:
            if what == "sth":
                data: Any = client.get("/v1/log/sth", params=_drop_none(tree_size=tree_size))
            elif what == "public-key":
                data = client.get("/v1/log/public-key")
            elif what == "inclusion":
                params = _drop_none(leaf_index=leaf_index, leaf_hash=leaf_hash, serial=serial,
                                    tree_size=tree_size)
                data = client.get("/v1/log/proof/inclusion", params=params)
            elif what == "consistency":
                if first is None:
                    _fail("consistency needs --first (and optionally --second)", EXIT_USAGE)
                data = client.get("/v1/log/proof/consistency",
                                  params=_drop_none(first=first, second=second))
            elif what == "entry":
                if leaf_index is None:
                    _fail("entry needs --leaf-index", EXIT_USAGE)
                got = client.get("/v1/log/entries", params={"start": leaf_index,
                                                             "end": leaf_index})
                if not got:
                    _fail(f"leaf {leaf_index} is not in the log")
                data = got[0]
            elif what == "entries":
                if end is None:
                    end = int(client.get("/v1/log/sth")["tree_size"]) - 1
                data = []
                pos = start
                while pos <= end:
                    page = client.get("/v1/log/entries", params={"start": pos, "end": end})
                    if not page:
                        break
                    data.extend(page)
                    pos = int(page[-1]["leaf_index"]) + 1
            else:
                _fail(f"unknown item {what!r}: sth, public-key, inclusion, consistency, entry, "
                      "entries", EXIT_USAGE)
    except ApiError as exc:
        if exc.unreachable:
            _fail(f"{exc.detail} — is `fleettrust serve` running there?")
        _fail(f"{exc.detail} ({exc.code}, HTTP {exc.status})")
    raw = data if isinstance(data, bytes) else (json.dumps(data, indent=2) + "\n").encode()
    if out is None:
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(raw)
        _err.print(f"wrote {out}")


def _drop_none(**kw: Any) -> dict[str, Any]:
    return {k: v for k, v in kw.items() if v is not None}


def device_history(
    device_id: str,
    public_key: Annotated[Path | None, typer.Option(
        "--public-key", dir_okay=False, show_default=False,
        help="the log's public key (PEM) to check the tree head with; default: ask the server "
             "(trust on first use)")] = None,
    server: ServerOpt = DEFAULT_SERVER,
    token: TokenOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of text")] = False,
) -> None:
    """A device's story from the transparency log, each event's inclusion proof checked."""
    from fleettrust.cli.client import ApiError, Client
    from fleettrust.ledger import verify as lv
    from fleettrust.ledger.sth import (
        InclusionProof,
        SignedTreeHead,
        TreeHeadError,
        load_public_key,
    )

    if not token:
        _fail("no API token: pass --token or set FLEETTRUST_TOKEN", EXIT_USAGE)
    try:
        with Client(server, token) as client:
            hist = client.get(f"/v1/devices/{device_id}/history")
            key_pem = public_key.read_bytes() if public_key else client.get("/v1/log/public-key")
    except ApiError as exc:
        if exc.unreachable:
            _fail(f"{exc.detail} — is `fleettrust serve` running there?")
        _fail(f"{exc.detail} ({exc.code}, HTTP {exc.status})")
    except OSError as exc:
        _fail(f"cannot read public key {public_key}: {exc.strerror or exc}", EXIT_USAGE)
    rows = []
    try:
        key = load_public_key(key_pem)
        head = SignedTreeHead.from_json(hist["sth"])
        lv.check_sth(head, key)
        for ev in hist["events"]:
            got = lv.verify_inclusion(head, InclusionProof.from_json(ev["inclusion_proof"]), ev,
                                      key)
            rows.append((got.leaf_index, got.entry))
    except lv.LogVerificationError as exc:
        _fail(f"{exc.message} ({exc.code})")
    except TreeHeadError as exc:
        _fail(f"the server's answer is not valid: {exc} ({exc.code})")
    if as_json:
        typer.echo(json.dumps(hist, indent=2))
        return
    from rich.table import Table

    table = Table(title=f"device {device_id}: {len(rows)} logged events")
    for col in ("leaf", "occurred_at", "action", "actor", "details"):
        table.add_column(col, overflow="fold")
    for index, body in rows:
        ev = body.get("event", {})
        details = dict(ev.get("details") or {})
        if body.get("certificates"):
            details["certificates"] = [c["serial"] for c in body["certificates"]]
        table.add_row(str(index), str(ev.get("occurred_at")), str(ev.get("action")),
                      str(ev.get("actor")), escape(json.dumps(details, sort_keys=True)[:200]))
    _out.print(table)
    for p in hist.get("pending", []):
        _out.print(f"pending (not yet in the log): {escape(str(p['action']))} at "
                   f"{p['occurred_at']}")
    source = "the given public key" if public_key else "the server's key (pin it: --public-key)"
    _out.print(f"every inclusion proof verified against the STH of size {head.tree_size}, "
               f"signature checked with {source}")
