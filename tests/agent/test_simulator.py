"""The fleet simulator: loopback guard, enrollment through the bulk endpoint, the three modes,
state-root reuse — against the PROTOCOL STUBs (tests/agent/stub_gateway.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fleettrust.agent.simulator import (
    SimulationConfig,
    SimulationError,
    ensure_loopback_url,
    percentile,
    run_simulation,
)
from fleettrust.agent.state import StateStore
from tests.agent.pki_helpers import TestPKI
from tests.agent.stub_gateway import StubGateway, StubOperatorAPI


@pytest.mark.parametrize("url", ["https://127.0.0.1:8443", "https://127.8.9.10",
                                 "https://[::1]:8443/", "https://localhost:8443"])
def test_loopback_urls_are_accepted(url: str) -> None:
    ensure_loopback_url(url, "gateway")


@pytest.mark.parametrize("url", ["https://10.0.0.1:8443", "https://example.com",
                                 "https://0.0.0.0:8443", "https://[::ffff:8.8.8.8]",
                                 "https://localhost.example.com", "https://127.0.0.1.nip.io"])
def test_non_loopback_urls_are_refused(url: str) -> None:
    with pytest.raises(SimulationError) as info:
        ensure_loopback_url(url, "gateway")
    assert info.value.code == "not_loopback"


def test_config_refuses_non_loopback_before_doing_anything(tmp_path: Path) -> None:
    config = SimulationConfig(devices=2, gateway="https://192.0.2.1:8443", duration_s=1,
                              state_root=tmp_path / "sim")
    with pytest.raises(SimulationError) as info:
        run_simulation(config)
    assert info.value.code == "not_loopback"
    assert not (tmp_path / "sim").exists()
    with pytest.raises(SimulationError) as info:
        SimulationConfig(devices=2, gateway="https://127.0.0.1:1", duration_s=1,
                         server="http://203.0.113.5:8080").validate()
    assert info.value.code == "not_loopback"


@pytest.mark.parametrize("kwargs", [{"devices": 0}, {"devices": 100_001}, {"duration_s": 0},
                                    {"duration_s": 3601}, {"concurrency": 0},
                                    {"mode": "burst"}, {"max_checkins": 0}])
def test_bounds(kwargs: dict[str, object]) -> None:
    base: dict[str, object] = {"devices": 1, "gateway": "https://127.0.0.1:1", "duration_s": 1}
    base.update(kwargs)
    with pytest.raises(SimulationError) as info:
        SimulationConfig(**base).validate()  # type: ignore[arg-type]
    assert info.value.code == "bad_config"


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([], 50) is None


def test_enroll_run_modes_and_reuse(tmp_path: Path) -> None:
    test_pki = TestPKI()
    root = tmp_path / "fleet"
    with StubGateway(test_pki, tmp_path) as gw, \
            StubOperatorAPI(test_pki, "factory-token", gateway=gw.state) as api:
        snapshots = []
        report = run_simulation(SimulationConfig(
            devices=6, gateway=gw.url, duration_s=5, server=api.url, token="factory-token",
            batch_id="bat_sim", concurrency=3, state_root=root, max_checkins=30,
            enroll_chunk=4, progress_interval_s=0.05), on_progress=snapshots.append)
        assert report.devices_enrolled == 6
        assert [len(items) for _, items in api.received] == [4, 2]  # chunks
        assert all(p.endswith("/devices/bulk") for p, _ in api.received)
        assert report.checkins_ok == 30
        assert report.checkins_failed == 0
        assert report.stopped_by == "max_checkins"
        assert report.connections == 6  # keepalive: one connection per device
        assert report.latency_ms["p50"] is not None
        assert report.latency_ms["p99"] >= report.latency_ms["p50"]  # type: ignore[operator]
        assert {s.phase for s in snapshots} >= {"enrolling", "done"}
        # every check-in was signed by the right key and carried the right manifest
        assert len({c.serial for c in gw.checkins()}) == 6
        for directory in sorted(root.iterdir()):
            StateStore(directory).load()

        handshake = run_simulation(SimulationConfig(
            devices=6, gateway=gw.url, duration_s=5, concurrency=3, state_root=root,
            mode="handshake", max_checkins=12))
        assert handshake.devices_reused == 6
        assert handshake.devices_enrolled == 0
        assert handshake.connections == 12  # one full handshake per check-in
        assert handshake.resumed_connections == 0

        resume = run_simulation(SimulationConfig(
            devices=6, gateway=gw.url, duration_s=5, concurrency=3, state_root=root,
            mode="resume", max_checkins=18))
        assert resume.connections == 18
        assert resume.resumed_connections >= 6  # all but (at most) each device's first
        assert resume.resumption_rate is not None

        gw.state.fail_next.extend([503, 503])
        gw.state.renew = True
        mixed = run_simulation(SimulationConfig(
            devices=6, gateway=gw.url, duration_s=5, concurrency=2, state_root=root,
            max_checkins=10))
        assert mixed.errors == {"503 unavailable": 2}
        assert mixed.renewals >= 1  # two workers may both see renew=true
        assert json.loads(json.dumps(mixed.to_json()))["checkins_failed"] == 2


def test_not_enough_devices_without_credentials(tmp_path: Path) -> None:
    with pytest.raises(SimulationError) as info:
        run_simulation(SimulationConfig(devices=2, gateway="https://127.0.0.1:1",
                                        duration_s=1, state_root=tmp_path / "empty"))
    assert info.value.code == "not_enough_devices"


def test_simulate_command_writes_json(tmp_path: Path) -> None:
    import typer

    from fleettrust.cli.agent import simulate

    app = typer.Typer()
    app.command("simulate")(simulate)
    app.command("noop")(lambda: None)  # keep "simulate" a sub-command, as in cli/main.py
    test_pki = TestPKI()
    with StubGateway(test_pki, tmp_path) as gw, \
            StubOperatorAPI(test_pki, "tok", gateway=gw.state) as api:
        out = tmp_path / "summary.json"
        result = CliRunner().invoke(app, [
            "simulate", "--devices", "3", "--server", api.url, "--token", "tok", "--batch",
            "bat_1", "--gateway", gw.url, "--duration", "0.5", "--concurrency", "3",
            "--json-out", str(out), "--no-live"])
        assert result.exit_code == 0, result.output
        summary = json.loads(out.read_text())
        assert summary["devices"] == 3
        assert summary["checkins_ok"] > 0
        refused = CliRunner().invoke(app, ["simulate", "--devices", "1", "--gateway",
                                           "https://198.51.100.7:8443", "--duration", "1"])
        assert refused.exit_code == 2
        assert "not_loopback" in refused.output
