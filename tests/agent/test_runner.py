"""The agent against the PROTOCOL STUB gateway (tests/agent/stub_gateway.py) over real mTLS:
check-ins, persisted counters, retries with back-off, refusals, renewal, pinning, SIGTERM."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleettrust.agent.backoff import BackoffPolicy
from fleettrust.agent.runner import Agent, AgentConfig
from fleettrust.agent.state import StateError, StateStore
from tests.agent.conftest import Enrolled, enroll_device
from tests.agent.pki_helpers import TestPKI
from tests.agent.stub_gateway import StubGateway

FAST = BackoffPolicy(base_s=0.01, cap_s=0.05)


def _config(enrolled: Enrolled, gw: StubGateway, **kw: object) -> AgentConfig:
    defaults: dict[str, object] = {
        "state_dir": enrolled.state_dir, "gateway_url": gw.url, "backoff": FAST,
        "min_checkin_interval_s": 0.01, "refusal_retry_s": 0.02, "timeout_s": 5.0}
    defaults.update(kw)
    return AgentConfig(**defaults)  # type: ignore[arg-type]


def _agent(enrolled: Enrolled, gw: StubGateway, **kw: object) -> Agent:
    return Agent(_config(enrolled, gw, **kw), rng=random.Random(5), manifest=enrolled.manifest)


def test_checkins_on_one_kept_alive_connection(enrolled: Enrolled, gateway: StubGateway) -> None:
    gateway.state.register(enrolled.certificate, str(enrolled.state.device_id))
    gateway.state.next_checkin_s = 0.01
    with _agent(enrolled, gateway) as agent:
        summary = agent.run(max_checkins=3)
    assert summary.checkins_ok == 3
    assert summary.exit_code == 0
    checkins = gateway.checkins()
    assert len(checkins) == 3
    assert {c.connection for c in checkins} == {checkins[0].connection}  # kept alive
    body = checkins[0].body
    assert body["boot_counter"] == 1
    assert body["manifest"] == enrolled.manifest.to_dict()
    generations = [c.body["agent_generation"] for c in checkins]
    assert generations == sorted(generations)
    assert len(set(generations)) == 3
    assert 0 < len(body["health"]["metrics"]) <= 32
    state = StateStore(enrolled.state_dir).read()
    assert state.checkins_ok == 3
    assert state.last_checkin is not None
    assert state.last_checkin.outcome == "ok"
    assert state.last_checkin.device_status == "active"
    # a second start counts a second boot
    with _agent(enrolled, gateway) as agent:
        assert agent.run(once=True).exit_code == 0
    assert gateway.checkins()[-1].body["boot_counter"] == 2


def test_transient_failures_back_off_and_recover(enrolled: Enrolled, gateway: StubGateway,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    gateway.state.register(enrolled.certificate, str(enrolled.state.device_id))
    gateway.state.next_checkin_s = 0.01
    gateway.state.fail_next.extend([503, 500])
    gateway.state.drop_next = 1
    caplog.set_level(logging.INFO, logger="fleettrust.agent")
    with _agent(enrolled, gateway) as agent:
        summary = agent.run(max_checkins=1)
    assert summary.failures == 3
    assert summary.checkins_ok == 1
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 3
    assert "HTTP 503 unavailable" in retries[0] or "HTTP 503 unavailable" in retries[1]
    assert "retry 3 in" in retries[2]


def test_gateway_down_once_exits_4(enrolled: Enrolled, tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = AgentConfig(state_dir=enrolled.state_dir, gateway_url=f"https://127.0.0.1:{port}",
                         backoff=FAST)
    with Agent(config, manifest=enrolled.manifest) as agent:
        summary = agent.run(once=True)
    assert summary.exit_code == 4
    assert summary.last_error_code == "connect_error"
    last = StateStore(enrolled.state_dir).read().last_checkin
    assert last is not None
    assert last.outcome == "error"
    assert last.code == "connect_error"


@pytest.mark.parametrize(("status", "code"), [("suspended", "device_suspended"),
                                              ("decommissioned", "device_decommissioned")])
def test_refusals_are_logged_precisely(enrolled: Enrolled, gateway: StubGateway,
                                       caplog: pytest.LogCaptureFixture, status: str,
                                       code: str) -> None:
    gateway.state.register(enrolled.certificate, str(enrolled.state.device_id), status)
    with _agent(enrolled, gateway) as agent:
        summary = agent.run(once=True)
    assert summary.exit_code == 3
    assert summary.last_error_code == code
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(f"check-in refused by gateway: HTTP 403 {code}" in m for m in errors)
    if status == "decommissioned":
        assert any("permanent" in m for m in errors)
    last = StateStore(enrolled.state_dir).read().last_checkin
    assert last is not None
    assert (last.outcome, last.http_status, last.code) == ("refused", 403, code)


def test_unknown_certificate_refused(enrolled: Enrolled, gateway: StubGateway) -> None:
    with _agent(enrolled, gateway) as agent:  # not registered with the stub
        summary = agent.run(once=True)
    assert summary.last_error_code == "certificate_unknown"


def test_renewal_when_the_gateway_asks(enrolled: Enrolled, gateway: StubGateway) -> None:
    gateway.state.register(enrolled.certificate, str(enrolled.state.device_id))
    gateway.state.renew = True
    gateway.state.next_checkin_s = 0.01
    old = StateStore(enrolled.state_dir).load()
    old_files = old.state.referenced_files()
    with _agent(enrolled, gateway) as agent:
        summary = agent.run(max_checkins=2)
    assert summary.renewals == 1
    new = StateStore(enrolled.state_dir).load()
    assert new.state.device_id == old.state.device_id
    assert new.state.certificate_serial != old.state.certificate_serial
    assert new.key.public_key() != old.key.public_key()
    assert new.state.renewal.count == 1
    assert new.state.renewal.previous_serial == old.state.certificate_serial
    assert new.state.root_fingerprint == old.state.root_fingerprint
    names = {p.name for p in enrolled.state_dir.iterdir()}
    assert not (old_files & names), "old key/certificate files must be removed"
    paths = [r.path for r in gateway.state.requests]
    assert paths == ["/v1/device/checkin", "/v1/device/renew", "/v1/device/checkin"]
    # the check-in after the renewal presents the NEW certificate
    assert gateway.state.requests[-1].serial == new.certificate.serial_number  # type: ignore[union-attr]


def test_renewal_when_expiry_is_near(test_pki: TestPKI, tmp_path: Path,
                                     gateway: StubGateway) -> None:
    enrolled = enroll_device(test_pki, tmp_path / "short", validity_days=20)
    gateway.state.register(enrolled.certificate, str(enrolled.state.device_id))
    with _agent(enrolled, gateway) as agent:
        outcome = agent.checkin()
    assert outcome.ok
    assert outcome.renewed
    state = StateStore(enrolled.state_dir).read()
    assert state.renewal.count == 1
    assert state.certificate_not_after is not None
    assert state.certificate_not_after > str(enrolled.certificate.not_valid_after_utc.year)


def test_failed_renewal_backs_off_and_keeps_the_old_identity(enrolled: Enrolled,
                                                             gateway: StubGateway) -> None:
    gateway.state.register(enrolled.certificate, str(enrolled.state.device_id))
    with _agent(enrolled, gateway) as agent:
        gateway.state.fail_next.append(503)
        assert not agent.renew()
        gateway.state.renew = True  # still backing off: the check-in must not renew
        outcome = agent.checkin()
    assert outcome.ok
    assert not outcome.renewed
    assert [r.path for r in gateway.state.requests] == ["/v1/device/renew",
                                                        "/v1/device/checkin"]
    identity = StateStore(enrolled.state_dir).load()
    assert identity.certificate == enrolled.certificate
    renewal = identity.state.renewal
    assert (renewal.count, renewal.consecutive_failures) == (0, 1)
    assert renewal.next_attempt_at is not None
    assert renewal.last_error is not None
    assert "HTTP 503" in renewal.last_error


def test_server_certificate_from_a_foreign_ca_is_rejected(enrolled: Enrolled,
                                                          tmp_path: Path) -> None:
    foreign = TestPKI(name="Foreign")
    with StubGateway(foreign, tmp_path) as gw, _agent(enrolled, gw) as agent:
        outcome = agent.checkin()
    assert not outcome.ok
    assert outcome.error is not None
    assert outcome.error.code == "tls_error"
    assert "certificate" in outcome.error.message
    assert gw.state.requests == []


def test_pkcs11_or_unenrolled_state_cannot_run(tmp_path: Path) -> None:
    from fleettrust.agent.enroll import enroll
    from fleettrust.pki.manifest import normalize_manifest

    enroll(tmp_path / "pending", manifest=normalize_manifest({"cpu_serial": "P1"}))
    agent = Agent(AgentConfig(state_dir=tmp_path / "pending", gateway_url="https://127.0.0.1:1"))
    with pytest.raises(StateError) as info:
        agent.start()
    assert info.value.code == "not_enrolled"
    StateStore(tmp_path / "pending").acquire_lock()  # the failed start released the lock


def test_sigterm_stops_the_agent_cleanly(enrolled: Enrolled, gateway: StubGateway) -> None:
    gateway.state.register(enrolled.certificate, str(enrolled.state.device_id))
    gateway.state.next_checkin_s = 300  # the agent will be sleeping when SIGTERM arrives
    code = ("import sys; from fleettrust.cli.agent import agent_app; "
            "sys.argv=['agent']+sys.argv[1:]; agent_app()")
    manifest_file = enrolled.state_dir.parent / "manifest.json"
    manifest_file.write_text(__import__("json").dumps(enrolled.manifest.to_dict()))
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "run", "--state-dir", str(enrolled.state_dir),
         "--gateway", gateway.url, "--manifest-file", str(manifest_file)],
        stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
    deadline = time.monotonic() + 20
    while not gateway.checkins() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gateway.checkins(), "agent never checked in"
    time.sleep(0.2)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=10)
    assert time.monotonic() - started < 5
    assert proc.returncode == 0, stderr
    assert "agent stopping on request" in stderr
    assert "check-in ok" in stderr
    StateStore(enrolled.state_dir).load()
