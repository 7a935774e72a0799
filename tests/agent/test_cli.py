"""`fleettrust agent …` commands (the Typer sub-app, invoked directly)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleettrust.agent.state import StateStore
from fleettrust.cli.agent import agent_app
from fleettrust.pki.csr import check_key_allowed, load_csr
from fleettrust.pki.manifest import normalize_manifest
from tests.agent.pki_helpers import TestPKI, write_json
from tests.agent.stub_gateway import StubGateway, StubOperatorAPI

runner = CliRunner()


def _manifest_file(tmp_path: Path) -> Path:
    return write_json(tmp_path / "manifest.json",
                      {"cpu_serial": "CLI-0001", "mac_addresses": ["02:00:00:00:01:01"],
                       "imei": "490154203237518"})


def test_enroll_writes_a_valid_csr_and_manifest(tmp_path: Path) -> None:
    state_dir = tmp_path / "dev"
    result = runner.invoke(agent_app, ["enroll", "--state-dir", str(state_dir),
                                       "--manifest-file", str(_manifest_file(tmp_path))])
    assert result.exit_code == 0, result.output
    request = json.loads((state_dir / "enroll-request.json").read_text())
    assert set(request) == {"csr", "manifest"}
    csr = load_csr(request["csr"].encode())  # parses and its self-signature verifies
    check_key_allowed(csr.public_key())
    assert normalize_manifest(request["manifest"]).imei == "490154203237518"
    identity = StateStore(state_dir).load()
    assert identity.state.phase == "enrolling"
    assert identity.key.public_key() == csr.public_key()
    # running enroll again while still enrolling reuses the key
    again = runner.invoke(agent_app, ["enroll", "--state-dir", str(state_dir),
                                      "--manifest-file", str(_manifest_file(tmp_path))])
    assert again.exit_code == 0, again.output
    csr2 = load_csr(json.loads((state_dir / "enroll-request.json").read_text())["csr"].encode())
    assert csr2.public_key() == csr.public_key()


def test_enroll_install_status_run(tmp_path: Path) -> None:
    test_pki = TestPKI()
    state_dir = tmp_path / "dev"
    assert runner.invoke(agent_app, ["enroll", "--state-dir", str(state_dir), "--manifest-file",
                                     str(_manifest_file(tmp_path))]).exit_code == 0
    request = json.loads((state_dir / "enroll-request.json").read_text())
    response = write_json(tmp_path / "response.json",
                          test_pki.issue_response(request["csr"], request["manifest"]))
    result = runner.invoke(agent_app, ["install", "--state-dir", str(state_dir),
                                       "--response", str(response)])
    assert result.exit_code == 0, result.output
    assert "enrolled device d-" in result.output
    status = runner.invoke(agent_app, ["status", "--state-dir", str(state_dir), "--json"])
    assert status.exit_code == 0, status.output
    assert json.loads(status.output)["phase"] == "enrolled"
    with StubGateway(test_pki, tmp_path) as gw:
        state = StateStore(state_dir).load()
        assert state.certificate is not None
        gw.state.register(state.certificate, str(state.state.device_id))
        result = runner.invoke(agent_app, ["run", "--state-dir", str(state_dir), "--gateway",
                                           gw.url, "--once"])
        assert result.exit_code == 0, result.output
        gw.state.set_status(str(state.state.device_id), "suspended")
        result = runner.invoke(agent_app, ["run", "--state-dir", str(state_dir), "--once"])
        assert result.exit_code == 3  # refused; the gateway URL was remembered


def test_install_errors_are_one_line(tmp_path: Path) -> None:
    result = runner.invoke(agent_app, ["install", "--state-dir", str(tmp_path / "none"),
                                       "--response", str(write_json(tmp_path / "r.json", {}))])
    assert result.exit_code == 1
    assert "state_missing" in result.output


def test_station_enroll_submits_and_installs(tmp_path: Path) -> None:
    test_pki = TestPKI()
    with StubOperatorAPI(test_pki, token="factory-token") as api:
        state_dir = tmp_path / "dev"
        result = runner.invoke(agent_app, [
            "enroll", "--state-dir", str(state_dir), "--manifest-file",
            str(_manifest_file(tmp_path)), "--server", api.url, "--token", "factory-token",
            "--batch", "bat_1", "--station", "line-1"])
        assert result.exit_code == 0, result.output
        assert api.received[0][0] == "/v1/batches/bat_1/devices"
        assert api.received[0][1][0]["station"] == "line-1"
        assert StateStore(state_dir).load().state.phase == "enrolled"
        bad = runner.invoke(agent_app, [
            "enroll", "--state-dir", str(tmp_path / "dev2"), "--manifest-file",
            str(_manifest_file(tmp_path)), "--server", api.url, "--token", "wrong",
            "--batch", "bat_1"])
        assert bad.exit_code == 1
        assert "operator_api_error" in bad.output


@pytest.mark.parametrize("args", [["--server", "http://127.0.0.1:1"],
                                  ["--token", "t", "--batch", "b"]])
def test_station_options_go_together(tmp_path: Path, args: list[str]) -> None:
    result = runner.invoke(agent_app, ["enroll", "--state-dir", str(tmp_path), *args])
    assert result.exit_code == 2
