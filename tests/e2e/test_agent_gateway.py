"""End to end: the real ``fleettrust agent`` (subprocess) and simulator against the real device
gateway (mutual TLS) and operator API, on SQLite and PostgreSQL.

Covered: factory enrollment through the operator API, check-in, reboot (boot counter recorded),
renewal when the gateway says ``renew`` (the next check-in uses the new certificate, same device
id), quarantine (told, not refused), decommissioning (refused, exit 3, code logged), and the fleet
simulator in its three modes. The SIGKILL tests are in test_agent_kill.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import select, update

from fleettrust.agent.simulator import SimulationConfig, run_simulation
from fleettrust.agent.state import StateStore
from fleettrust.services import gateway as gw_svc
from fleettrust.storage.models import Certificate, Device
from tests.e2e.conftest import Stack, read_state


def _device(stack: Stack, device_id: str) -> Device:
    with stack.ctx.sessions() as s:
        d = s.get(Device, device_id)
        assert d is not None
        s.expunge(d)
        return d


def _certificates(stack: Stack, device_id: str) -> dict[str, str]:
    with stack.ctx.sessions() as s:
        rows = s.execute(select(Certificate.serial_hex, Certificate.status)
                         .where(Certificate.device_id == device_id)).all()
    return dict(rows)


def test_enroll_check_in_and_reboot(stack: Stack, tmp_path: Path) -> None:
    state_dir = tmp_path / "device"
    enrolled = stack.agent(*stack.enroll_args(state_dir), check=True)
    assert "enrolled device" in enrolled.stdout
    state = read_state(state_dir)
    assert state["phase"] == "enrolled"
    device_id = state["device_id"]
    assert state["boot_counter"] == 0

    first = stack.agent(*stack.run_args(state_dir), check=True)
    assert "check-in ok" in first.stderr
    state = read_state(state_dir)
    assert state["boot_counter"] == 1
    assert state["checkins_ok"] == 1
    assert state["last_checkin"]["outcome"] == "ok"
    assert state["last_checkin"]["device_status"] == "active"
    device = _device(stack, device_id)
    assert device.checkin_count == 1
    assert device.boot_counter == 1
    assert device.agent_generation is not None
    assert device.last_remote_addr == "127.0.0.1"
    assert device.firmware_version
    assert device.firmware_version.startswith("fleettrust-agent-")
    assert device.last_seen_at is not None
    first_seen = device.last_seen_at

    second = stack.agent(*stack.run_args(state_dir), check=True)
    assert "check-in ok" in second.stderr
    state = read_state(state_dir)
    assert state["boot_counter"] == 2
    device = _device(stack, device_id)
    assert device.checkin_count == 2
    assert device.boot_counter == 2, "the server must record the new boot counter"
    assert device.last_seen_at is not None
    assert device.last_seen_at >= first_seen
    assert device.agent_generation is not None
    assert device.agent_generation < state["generation"]
    assert StateStore(state_dir).load().state.device_id == device_id


def test_renewal_when_the_gateway_says_renew(stack: Stack, tmp_path: Path) -> None:
    state_dir = tmp_path / "device"
    stack.set_validity(10)  # expires within RENEW_BEFORE (30 days): the gateway says renew
    stack.agent(*stack.enroll_args(state_dir), check=True)
    stack.set_validity(3650)  # the renewed certificate is long-lived
    before = read_state(state_dir)
    device_id, old_serial = before["device_id"], before["certificate_serial"]

    renewing = stack.agent(*stack.run_args(state_dir), check=True)
    assert "(gateway asked)" in renewing.stderr, renewing.stderr
    assert "certificate renewed" in renewing.stderr
    after = read_state(state_dir)
    assert after["device_id"] == device_id
    assert after["certificate_serial"] != old_serial
    assert after["renewal"]["count"] == 1
    assert after["renewal"]["previous_serial"] == old_serial
    assert after["certificate_not_after"] > before["certificate_not_after"]
    certificates = _certificates(stack, device_id)
    assert set(certificates) == {old_serial, after["certificate_serial"]}
    identity = StateStore(state_dir).load()
    assert identity.certificate is not None
    assert format(identity.certificate.serial_number, "x") == after["certificate_serial"]

    # Put the OLD certificate on hold: a check-in that still used it would be refused.
    with stack.ctx.transaction() as s:
        s.execute(update(Certificate).where(Certificate.serial_hex == old_serial)
                  .values(status="hold"))
    again = stack.agent(*stack.run_args(state_dir))
    assert again.returncode == 0, again.stderr
    assert "renewing certificate" not in again.stderr  # the new certificate is not near expiry
    final = read_state(state_dir)
    assert final["device_id"] == device_id
    assert final["certificate_serial"] == after["certificate_serial"]
    assert final["last_checkin"]["outcome"] == "ok"
    device = _device(stack, device_id)
    assert device.checkin_count == 2
    assert device.boot_counter == 2


def test_quarantined_then_decommissioned(stack: Stack, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    state_dir = tmp_path / "device"
    stack.agent(*stack.enroll_args(state_dir), check=True)
    stack.agent(*stack.run_args(state_dir), check=True)
    device_id = read_state(state_dir)["device_id"]

    # Quarantined: the check-in is still accepted, and the device is told.
    gw_svc.set_device_status(stack.ctx, stack.admin, device_id, "quarantined", "e2e test")
    proc = stack.agent(*stack.run_args(state_dir))
    assert proc.returncode == 0, proc.stderr
    assert "status quarantined" in proc.stderr
    state = read_state(state_dir)
    assert state["last_checkin"]["outcome"] == "ok"
    assert state["last_checkin"]["device_status"] == "quarantined"
    assert state["checkins_ok"] == 2
    assert _device(stack, device_id).checkin_count == 2

    # Decommissioned: refused with the precise code, logged on both sides, exit code 3.
    gw_svc.set_device_status(stack.ctx, stack.admin, device_id, "decommissioned", "e2e test")
    with caplog.at_level(logging.WARNING, logger="fleettrust.gateway"):
        proc = stack.agent(*stack.run_args(state_dir))
    assert proc.returncode == 3, (proc.returncode, proc.stderr)
    assert "device_decommissioned" in proc.stderr
    assert "permanent" in proc.stderr
    state = read_state(state_dir)
    assert state["last_checkin"]["outcome"] == "refused"
    assert state["last_checkin"]["http_status"] == 403
    assert state["last_checkin"]["code"] == "device_decommissioned"
    assert state["checkins_ok"] == 2
    assert any("device_decommissioned" in r.getMessage() for r in caplog.records), \
        "the gateway logs the precise refusal"
    assert _device(stack, device_id).checkin_count == 2


def test_simulator_against_the_real_gateway(stack: Stack, tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    report = run_simulation(SimulationConfig(
        devices=50, gateway=stack.gateway.url, duration_s=5.0, server=stack.api.url,
        token=stack.factory_token, batch_id=stack.batch_id, concurrency=50, state_root=root,
        enroll_chunk=25, seed=7))
    assert report.devices_enrolled == 50
    assert report.errors == {}, report.errors
    assert report.checkins_failed == 0
    assert report.checkins_ok > 100, report
    assert report.connections == 50  # kept alive: one handshake per device
    with stack.ctx.sessions() as s:
        recorded = s.scalar(select(Device.checkin_count.label("n"))
                            .where(Device.batch_id == stack.batch_id)
                            .order_by(Device.checkin_count.desc()).limit(1))
        total = sum(s.scalars(select(Device.checkin_count)
                              .where(Device.batch_id == stack.batch_id)))
        seen = s.scalar(select(Device.id).where(Device.batch_id == stack.batch_id,
                                                Device.last_seen_at.is_(None)).limit(1))
    assert total == report.checkins_ok, "every successful check-in is recorded exactly once"
    assert recorded is not None
    assert recorded >= 1
    assert seen is None, "every device checked in"

    # The same devices again: a new full mTLS handshake per check-in, then resumed sessions,
    # then kept alive through httpx (the agent's HTTP client) instead of the lean client.
    if "sqlite" not in stack.ctx.settings.database_url:
        return  # the client side does not depend on the database: once is enough
    for mode, client in (("handshake", "lean"), ("resume", "lean"), ("keepalive", "httpx")):
        again = run_simulation(SimulationConfig(
            devices=50, gateway=stack.gateway.url, duration_s=5.0, concurrency=8,
            state_root=root, mode=mode, max_checkins=100, seed=8,  # type: ignore[arg-type]
            client=client))  # type: ignore[arg-type]
        assert again.devices_reused == 50
        assert again.devices_enrolled == 0
        assert again.errors == {}, (mode, again.errors)
        assert again.checkins_ok == 100
        if mode == "keepalive":
            assert again.connections <= 50
            continue
        assert again.connections == 100
        if mode == "resume":
            assert again.resumed_connections >= 100 - 50, again  # all but each first one
        else:
            assert again.resumed_connections == 0


def test_agent_follows_the_revocation_feed(stack: Stack, tmp_path: Path) -> None:
    """After device B is revoked, device A's next check-in brings B's serial into A's local
    revocation copy (catch-up with since=N over mTLS), and the position only moves forward."""
    import json

    from fleettrust.services import revocation as rev

    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    stack.agent(*stack.enroll_args(a_dir, "a"), check=True)
    stack.agent(*stack.enroll_args(b_dir, "b"), check=True)
    b_state = read_state(b_dir)
    b_serials = set(_certificates(stack, b_state["device_id"]))
    stack.agent(*stack.run_args(a_dir), check=True)
    rev.revoke_device(stack.ctx, stack.admin, b_state["device_id"], "keyCompromise")
    run = stack.agent(*stack.run_args(a_dir), check=True)
    assert "revocation feed" in run.stderr, run.stderr
    local = json.loads((a_dir / "revocations.json").read_text())
    text = json.dumps(local)
    assert all(serial in text for serial in b_serials), text
    first_seq = local["last_seq"]
    assert first_seq >= 1
    stack.agent(*stack.run_args(a_dir), check=True)
    assert json.loads((a_dir / "revocations.json").read_text())["last_seq"] >= first_seq
    # B itself is refused from now on
    refused = stack.agent(*stack.run_args(b_dir))
    assert refused.returncode == 3
    assert "certificate_revoked" in refused.stderr
