"""The operator revocation routes over real HTTP: results, preview, operations, problem codes,
roles; and the CLI's offline root-CRL command."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import httpx
import pytest
import typer
from cryptography import x509
from typer.testing import CliRunner

from fleettrust.cli.revoke import ca_root_crl
from fleettrust.services import hierarchy
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from tests.conftest import ROOT_PASSPHRASE, Hierarchy, make_token
from tests.revocation.revocation_support import AppServer, counts, crl_app, issue


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_revocation_routes(ctx: ServiceContext, admin: Principal,
                           factory: hierarchy.FactoryCreated,
                           batch: hierarchy.BatchCreated) -> None:
    devs = issue(ctx, admin, batch.batch.id, 3)
    token = make_token(ctx, "admin", "ops")
    auditor = make_token(ctx, "auditor", "audrey")
    with AppServer(crl_app(ctx)) as api:
        a = _auth(token)
        p = api.get("/v1/revocation/preview", params={"scope": "batch",
                                                      "target_id": batch.batch.id},
                    headers=_auth(auditor))
        assert p.status_code == 200
        assert (p.json()["covered"], p.json()["would_revoke"]) == (3, 3)
        r = api.post(f"/v1/revocation/devices/{devs[0].device_id}",
                     json={"reason": "keyCompromise"}, headers=a)
        assert r.status_code == 200
        body = r.json()
        assert (body["covered"], body["newly_revoked"], body["state"]) == (1, 1, "done")
        op = api.get(f"/v1/revocation/operations/{body['operation_id']}",
                     headers=_auth(auditor)).json()
        assert (op["scope"], op["state"], op["rows_written"]) == ("device", "done", 1)
        r = api.post(f"/v1/revocation/devices/{devs[1].device_id}/suspend", headers=a, json={})
        assert r.status_code == 200
        assert r.json()["newly_revoked"] == 1
        r = api.post(f"/v1/revocation/devices/{devs[1].device_id}/release", headers=a, json={})
        assert r.status_code == 200
        assert r.json()["newly_revoked"] == 1
        r = api.post(f"/v1/revocation/batches/{batch.batch.id}", headers=a, json={})  # defaults
        assert (r.json()["covered"], r.json()["newly_revoked"]) == (3, 2)
        after = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        r = api.post(f"/v1/revocation/factories/{factory.factory.id}", headers=a,
                     json={"reason": "keyCompromise", "issued_after": after.isoformat(),
                           "issued_before": (after + dt.timedelta(hours=2)).isoformat()})
        assert r.status_code == 200
        assert r.json()["newly_revoked"] == 0
        ops = api.get("/v1/revocation/operations", headers=a).json()
        assert [o["scope"] for o in ops][:2] == ["window", "batch"]

        before = counts(ctx)
        problems = [
            (api.post("/v1/revocation/devices/d-unknown", headers=a, json={}), 404,
             "device_not_found"),
            (api.post("/v1/revocation/batches/bat_unknown", headers=a, json={}), 404,
             "batch_not_found"),
            (api.post("/v1/revocation/factories/fac_unknown", headers=a, json={}), 404,
             "factory_not_found"),
            (api.post(f"/v1/revocation/devices/{devs[2].device_id}", headers=a,
                      json={"reason": "stolen"}), 422, "bad_reason"),
            (api.post(f"/v1/revocation/factories/{factory.factory.id}", headers=a,
                      json={"issued_after": after.isoformat(),
                            "issued_before": after.isoformat()}), 422, "bad_window"),
            (api.post(f"/v1/revocation/factories/{factory.factory.id}", headers=a,
                      json={"issued_after": "2026-01-01T00:00:00"}), 422, "bad_window"),
            (api.post(f"/v1/revocation/devices/{devs[2].device_id}", headers=a,
                      json={"reason": "keyCompromise", "extra": 1}), 422, "unknown_field"),
            (api.post(f"/v1/revocation/devices/{devs[2].device_id}", json={},
                      headers=_auth(auditor)), 403, "role_not_allowed"),
            (api.post(f"/v1/revocation/devices/{devs[2].device_id}", json={}), 401,
             "no_token"),
            (api.get("/v1/revocation/preview", params={"scope": "planet", "target_id": "x"},
                     headers=a), 422, "bad_scope"),
            (api.get("/v1/revocation/operations/rop_nope", headers=a), 404,
             "operation_not_found"),
        ]
        for resp, status, code in problems:
            assert (resp.status_code, resp.json().get("code")) == (status, code), resp.text
        assert counts(ctx) == before


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_root_crl_is_offline_and_monotonic(ctx: ServiceContext, fleet: Hierarchy,
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    app = typer.Typer()
    app.command()(ca_root_crl)
    monkeypatch.setenv("FLEETTRUST_ROOT_PASSPHRASE", ROOT_PASSPHRASE.decode())
    runner = CliRunner()
    out1, out2 = tmp_path / "r1.crl", tmp_path / "r2.crl"
    res = runner.invoke(app, ["--dir", str(fleet.root_dir), "--out", str(out1)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["--dir", str(fleet.root_dir), "--out", str(out2),
                              "--revoke-serial", "0x1234", "--reason", "cACompromise"])
    assert res.exit_code == 0, res.output
    c1, c2 = (x509.load_der_x509_crl(p.read_bytes()) for p in (out1, out2))
    n1 = c1.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    n2 = c2.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert (n1, n2, len(list(c1)), [r.serial_number for r in c2]) == (1, 2, 0, [0x1234])
    assert c2.is_signature_valid(fleet.root_cert.public_key())  # type: ignore[arg-type]
    res = runner.invoke(app, ["--dir", str(fleet.root_dir), "--out", str(out2),
                              "--revoke-serial", "xyz"])
    assert res.exit_code != 0
    assert "not a hex serial" in res.output
    _ = httpx  # the module is imported for its type in the helpers
