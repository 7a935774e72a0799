"""``fleettrust log verify`` offline, and the log's HTTP API with ``log fetch`` / ``device
history`` against a live server.

Offline cases (only files and the public key): a good STH + entry + inclusion proof + older STH
+ consistency proof pass; a tampered entry, a forked tree head (two signed heads of one size with
different roots, and a consistency proof that fails between two signed heads — the log key
itself signs the forgeries, as a misbehaving log would), a bad inclusion proof and a bad STH
signature each fail with a precise message and exit 1; bad usage exits 2.
"""

from __future__ import annotations

import base64
import json
import warnings
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from sqlalchemy import select
from starlette.exceptions import StarletteDeprecationWarning
from typer.testing import CliRunner

from fleettrust.cli.log import device_history, log_app
from fleettrust.ledger import merkle
from fleettrust.ledger.sth import SignedTreeHead, load_public_key, log_id_of, sign_tree_head
from fleettrust.services import audit, hierarchy, ledger
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.ledger_models import LogKey
from tests.conftest import make_token
from tests.ledger.conftest import LedgerServer, issue, ledger_app

with warnings.catch_warnings():
    # Starlette prefers httpx2 for its TestClient; httpx (a project dependency) works the same.
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient

runner = CliRunner()


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj, indent=2))
    return path


def _events(ctx: ServiceContext, who: Principal, n: int, tag: str) -> None:
    with ctx.transaction() as s:
        for i in range(n):
            audit.record(s, who, "test.event", "test", f"{tag}-{i}", ctx.clock.now(), i=i)


def _forge(ctx: ServiceContext, size: int, root: bytes) -> dict[str, Any]:
    """A tree head the log's own key signs over a root of our choosing (a lying log)."""
    with ctx.sessions() as s:
        key = s.scalars(select(LogKey)).one()
    signer = ctx.signer(key.key_id)
    pub = signer.public_key()
    return sign_tree_head(signer.sign_bytes, log_id_of(pub), size, 1_800_000_000_000,  # type: ignore[arg-type]
                          root).to_json()


@pytest.fixture
def docs(ctx: ServiceContext, admin: Principal, tmp_path: Path) -> dict[str, Path]:
    _events(ctx, admin, 6, "old")
    ledger.sequence_once(ctx)
    old = ledger.latest_sth(ctx)
    _events(ctx, admin, 5, "new")
    ledger.sequence_once(ctx)
    new = ledger.latest_sth(ctx)
    assert (old.tree_size, new.tree_size) == (6, 11)
    pem, _ = ledger.public_key_pem(ctx)
    (tmp_path / "key.pem").write_bytes(pem)
    return {
        "key": tmp_path / "key.pem",
        "sth": _write(tmp_path / "sth.json", new.to_json()),
        "old": _write(tmp_path / "old.json", old.to_json()),
        "entry": _write(tmp_path / "entry.json", ledger.get_entries(ctx, admin, 3, 3)[0]),
        "proof": _write(tmp_path / "proof.json",
                        ledger.inclusion_proof(ctx, leaf_index=3).to_json()),
        "cons": _write(tmp_path / "cons.json", ledger.consistency_proof(ctx, 6, 11).to_json()),
        "entries": _write(tmp_path / "entries.json", ledger.get_entries(ctx, admin, 0, 10)),
    }


def _verify(d: dict[str, Path], *extra: str, sth: Path | None = None) -> Any:
    return runner.invoke(log_app, ["verify", "--sth", str(sth or d["sth"]), "--public-key",
                                   str(d["key"]), *extra])


def _full(d: dict[str, Path], **over: Path) -> list[str]:
    p = {**d, **over}
    return ["--entry", str(p["entry"]), "--inclusion", str(p["proof"]),
            "--old-sth", str(p["old"]), "--consistency", str(p["cons"])]


def test_good_documents_verify(docs: dict[str, Path]) -> None:
    r = _verify(docs, *_full(docs), "--entries", str(docs["entries"]))
    assert r.exit_code == 0, r.output
    assert "OK: STH of size 11" in r.output
    assert "OK: leaf 3 (audit event" in r.output
    assert "test.event on test old-3" in r.output
    assert "OK: the tree of size 11 extends the tree of size 6" in r.output
    assert "OK: the 11 entries rebuild the signed root" in r.output


def test_tampered_entry_is_detected(docs: dict[str, Path], tmp_path: Path) -> None:
    entry = json.loads(docs["entry"].read_text())
    # 1. the decoded form edited, the bytes left alone
    edited = {**entry, "entry": {**entry["entry"], "event": {**entry["entry"]["event"],
                                                             "target_id": "old-9"}}}
    r = _verify(docs, *_full(docs, entry=_write(tmp_path / "e1.json", edited)))
    assert r.exit_code == 1
    assert "tampered log entry (leaf 3): the decoded 'entry' differs from its leaf_data at " \
           "event.target_id (tampered_entry)" in r.output
    # 2. the bytes edited consistently with the decoded form
    data = base64.b64decode(entry["leaf_data"]).replace(b'"old-3"', b'"old-9"')
    forged = {**edited, "leaf_data": base64.b64encode(data).decode()}
    r = _verify(docs, *_full(docs, entry=_write(tmp_path / "e2.json", forged)))
    assert r.exit_code == 1
    assert f"tampered log entry: leaf 3's data hashes to {merkle.leaf_hash(data).hex()}" \
           in r.output
    assert "(tampered_entry)" in r.output
    # 3. every claimed hash rewritten too: the proof no longer leads to the signed root
    forged["leaf_hash"] = base64.b64encode(merkle.leaf_hash(data)).decode()
    proof = json.loads(docs["proof"].read_text())
    proof["leaf_hash"] = forged["leaf_hash"]
    r = _verify(docs, *_full(docs, entry=_write(tmp_path / "e3.json", forged),
                             proof=_write(tmp_path / "p3.json", proof)))
    assert r.exit_code == 1
    assert "bad inclusion proof: leaf 3 is not proven to be in the tree of size 11" in r.output
    # 4. a full download with one entry altered
    listing = json.loads(docs["entries"].read_text())
    listing[3] = {k: v for k, v in forged.items() if k != "leaf_hash"}
    r = _verify(docs, "--entries", str(_write(tmp_path / "all.json", listing)))
    assert r.exit_code == 1
    assert "tampered log: the 11 entries give root" in r.output


def test_forked_tree_heads_are_detected(ctx: ServiceContext, docs: dict[str, Path],
                                       tmp_path: Path) -> None:
    new = SignedTreeHead.from_json(json.loads(docs["sth"].read_text()))
    # same size, other root, validly signed: equivocation
    twin = _write(tmp_path / "twin.json", _forge(ctx, new.tree_size, merkle.leaf_hash(b"evil")))
    r = _verify(docs, "--old-sth", str(twin))
    assert r.exit_code == 1
    assert "forked tree head: two signed tree heads of size 11 have different roots" in r.output
    assert "(fork)" in r.output
    # an older head the current tree does not extend (valid signature, genuine proof)
    old_fork = _write(tmp_path / "oldfork.json", _forge(ctx, 6, merkle.leaf_hash(b"other")))
    r = _verify(docs, "--old-sth", str(old_fork), "--consistency", str(docs["cons"]))
    assert r.exit_code == 1
    assert "forked tree head: the tree of size 11 is not proven to extend the tree of size 6" \
           in r.output
    assert "(fork)" in r.output
    # a consistency proof with a flipped bit between the genuine heads
    cons = json.loads(docs["cons"].read_text())
    h = bytearray(base64.b64decode(cons["consistency"][0]))
    h[0] ^= 1
    cons["consistency"][0] = base64.b64encode(bytes(h)).decode()
    r = _verify(docs, "--old-sth", str(docs["old"]), "--consistency",
                str(_write(tmp_path / "badcons.json", cons)))
    assert r.exit_code == 1
    assert "(fork)" in r.output


def test_bad_inclusion_proof_is_detected(docs: dict[str, Path], tmp_path: Path) -> None:
    proof = json.loads(docs["proof"].read_text())
    h = bytearray(base64.b64decode(proof["audit_path"][1]))
    h[5] ^= 0x40
    flipped = {**proof, "audit_path": [proof["audit_path"][0], base64.b64encode(bytes(h)).decode(),
                                       *proof["audit_path"][2:]]}
    r = _verify(docs, "--entry", str(docs["entry"]), "--inclusion",
                str(_write(tmp_path / "p.json", flipped)))
    assert r.exit_code == 1
    assert "bad inclusion proof: leaf 3 is not proven to be in the tree of size 11" in r.output
    assert "(bad_inclusion_proof)" in r.output
    short = {**proof, "audit_path": proof["audit_path"][:-1]}
    r = _verify(docs, "--entry", str(docs["entry"]), "--inclusion",
                str(_write(tmp_path / "s.json", short)))
    assert r.exit_code == 1
    assert "inclusion path is too short" in r.output
    other = {**proof, "leaf_index": 4}
    r = _verify(docs, "--entry", str(docs["entry"]), "--inclusion",
                str(_write(tmp_path / "o.json", other)))
    assert r.exit_code == 1
    assert "the inclusion proof is for leaf 4, the entry is leaf 3 (mismatch)" in r.output


def test_bad_sth_signature_is_detected(docs: dict[str, Path], tmp_path: Path) -> None:
    sth = json.loads(docs["sth"].read_text())
    sig = bytearray(base64.b64decode(sth["tree_head_signature"]))
    sig[-3] ^= 0x01
    bad = _write(tmp_path / "bad.json", {**sth, "tree_head_signature":
                                         base64.b64encode(bytes(sig)).decode()})
    r = _verify(docs, sth=bad)
    assert r.exit_code == 1
    assert "STH signature is not valid for this log's public key (tree_size=11" in r.output
    assert "(bad_signature)" in r.output
    grown = _write(tmp_path / "grown.json", {**sth, "tree_size": 12})
    r = _verify(docs, sth=grown)
    assert r.exit_code == 1
    assert "(bad_signature)" in r.output
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "other.pem").write_bytes(stranger.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    r = runner.invoke(log_app, ["verify", "--sth", str(docs["sth"]), "--public-key",
                                str(tmp_path / "other.pem")])
    assert r.exit_code == 1
    assert "not from the log of this public key" in r.output


def test_usage_errors_exit_2(docs: dict[str, Path], tmp_path: Path) -> None:
    assert _verify(docs, "--entry", str(docs["entry"])).exit_code == 2
    assert _verify(docs, "--consistency", str(docs["cons"])).exit_code == 2
    (tmp_path / "junk.json").write_text("{nope")
    r = _verify(docs, sth=tmp_path / "junk.json")
    assert r.exit_code == 2
    assert "is not JSON" in r.output
    r = runner.invoke(log_app, ["verify", "--sth", str(docs["sth"]), "--public-key",
                                str(docs["sth"])])
    assert r.exit_code == 2
    assert "not a PEM public key" in r.output


# --- the API and the CLI's network side -----------------------------------------------------------


def test_api_reads(ctx: ServiceContext, admin: Principal, factory_principal: Principal,
                   batch: hierarchy.BatchCreated) -> None:
    with TestClient(ledger_app(ctx)) as api:
        r = api.get("/v1/log/sth")
        assert r.status_code == 404
        assert r.json()["code"] == "no_tree_head"
        dev, = issue(ctx, factory_principal, batch, 1)
        ledger.sequence_once(ctx)
        sth = SignedTreeHead.from_json(api.get("/v1/log/sth").json())
        r = api.get("/v1/log/public-key")
        assert r.headers["content-type"] == "application/x-pem-file"
        key = load_public_key(r.content)
        assert base64.b64decode(r.headers["X-Log-Id"]) == log_id_of(key) == sth.log_id
        # inclusion by index, by hash (hex and base64) and by certificate serial agree
        p1 = api.get("/v1/log/proof/inclusion", params={"leaf_index": sth.tree_size - 1}).json()
        lh = base64.b64decode(p1["leaf_hash"])
        p2 = api.get("/v1/log/proof/inclusion", params={"leaf_hash": lh.hex()}).json()
        p3 = api.get("/v1/log/proof/inclusion", params={"serial": dev.serial}).json()
        p4 = api.get("/v1/log/proof/inclusion",
                     params={"leaf_hash": base64.b64encode(lh).decode()}).json()
        assert p1 == p2 == p3 == p4
        merkle.verify_inclusion(p1["leaf_index"], sth.tree_size, lh,
                                [base64.b64decode(x) for x in p1["audit_path"]], sth.root_hash)
        r = api.get("/v1/log/proof/inclusion", params={"serial": "abc123"})
        assert r.status_code == 404
        assert r.json()["code"] == "certificate_not_logged"
        r = api.get("/v1/log/proof/inclusion", params={"leaf_hash": "zz"})
        assert r.status_code == 422
        assert r.json()["code"] == "bad_leaf_hash"
        r = api.get("/v1/log/proof/inclusion", params={"leaf_index": 0, "tree_size": 10**6})
        assert r.status_code == 404
        assert r.json()["code"] == "tree_size_unknown"
        r = api.get("/v1/log/proof/consistency", params={"first": 1, "second": 10**6})
        assert r.status_code == 404
        assert r.json()["code"] == "tree_size_unknown"
        c = api.get("/v1/log/proof/consistency", params={"first": 2}).json()
        assert c["second"] == sth.tree_size
        assert c["consistency"]
        assert api.get("/v1/log/sth", params={"tree_size": sth.tree_size}).json() == sth.to_json()
        assert api.get("/v1/log/sth", params={"tree_size": 1}).status_code == 404
        # entries need an operator or auditor; history follows device visibility
        assert api.get("/v1/log/entries", params={"start": 0, "end": 1}).status_code == 401
        auditor = {"Authorization": "Bearer " + make_token(ctx, "auditor", "ann")}
        got = api.get("/v1/log/entries", params={"start": 0, "end": 10**6}, headers=auditor)
        assert got.status_code == 200
        assert len(got.json()) == sth.tree_size
        fac = {"Authorization": "Bearer " + make_token(ctx, "factory", "s2",
                                                       batch.batch.factory_id)}
        assert api.get("/v1/log/entries", params={"start": 0, "end": 1},
                       headers=fac).status_code == 403
        h = api.get(f"/v1/devices/{dev.device_id}/history", headers=fac).json()
        assert [e["entry"]["event"]["action"] for e in h["events"]] == ["device.manufactured"]
        owner = {"Authorization": "Bearer " + make_token(ctx, "device-owner", "nobody")}
        r = api.get(f"/v1/devices/{dev.device_id}/history", headers=owner)
        assert r.status_code == 404


def test_fetch_then_verify_and_device_history(ctx: ServiceContext, admin: Principal,
                                              factory_principal: Principal,
                                              batch: hierarchy.BatchCreated,
                                              tmp_path: Path) -> None:
    dev, _ = issue(ctx, factory_principal, batch, 2)
    ledger.sequence_once(ctx)
    old_size = ledger.latest_sth(ctx).tree_size
    _events(ctx, admin, 3, "later")
    ledger.sequence_once(ctx)
    token = make_token(ctx, "auditor", "ann")
    with LedgerServer(ctx) as srv:
        base = ["--server", srv.url]

        def fetch(*args: str) -> None:
            r = runner.invoke(log_app, ["fetch", *args, *base, "--token", token])
            assert r.exit_code == 0, r.output

        fetch("sth", "--out", str(tmp_path / "sth.json"))
        fetch("sth", "--tree-size", str(old_size), "--out", str(tmp_path / "old.json"))
        fetch("public-key", "--out", str(tmp_path / "key.pem"))
        fetch("inclusion", "--serial", dev.serial, "--out", str(tmp_path / "proof.json"))
        index = json.loads((tmp_path / "proof.json").read_text())["leaf_index"]
        fetch("entry", "--leaf-index", str(index), "--out", str(tmp_path / "entry.json"))
        fetch("consistency", "--first", str(old_size), "--out", str(tmp_path / "cons.json"))
        fetch("entries", "--out", str(tmp_path / "entries.json"))
        r = runner.invoke(log_app, ["fetch", "entries", *base])  # entries need a token
        assert r.exit_code == 1
        assert "HTTP 401" in r.output
        r = runner.invoke(log_app, ["fetch", "sth", "--server", "http://127.0.0.1:9"])
        assert r.exit_code == 1
        assert "is `fleettrust serve` running there?" in r.output

        app = typer.Typer()
        app.command("history")(device_history)
        app.command("other")(lambda: None)  # keep "history" a sub-command
        r = runner.invoke(app, ["history", dev.device_id, *base, "--token", token,
                                "--public-key", str(tmp_path / "key.pem")])
        assert r.exit_code == 0, r.output
        assert "device.manufactured" in r.output
        assert dev.serial in r.output
        assert "every inclusion proof verified against the STH of size" in r.output
        r = runner.invoke(app, ["history", dev.device_id, *base, "--token", token, "--json"])
        assert r.exit_code == 0
        assert json.loads(r.stdout)["device_id"] == dev.device_id
        with httpx.Client(base_url=srv.url) as c:
            assert c.get("/v1/log/sth").status_code == 200
    r = runner.invoke(log_app, ["verify", "--sth", str(tmp_path / "sth.json"), "--public-key",
                                str(tmp_path / "key.pem"), "--entry", str(tmp_path / "entry.json"),
                                "--inclusion", str(tmp_path / "proof.json"), "--old-sth",
                                str(tmp_path / "old.json"), "--consistency",
                                str(tmp_path / "cons.json"), "--entries",
                                str(tmp_path / "entries.json")])
    assert r.exit_code == 0, r.output
    assert "device.manufactured on device " + dev.device_id in r.output
    assert "1 certificate(s)" in r.output
