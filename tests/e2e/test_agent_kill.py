"""SIGKILL the real agent process at random points of enrollment, check-in and renewal, talking
to the real operator API and device gateway: the state directory always loads and holds either
the old or the new identity (never a mix), and the device keeps working afterwards.

Each kill happens a seeded random delay after a synchronisation point (the agent wrapper's
``READY`` line, printed once Python has started and imported the agent, or the agent's own
``renewing certificate`` log line), drawn from the window the same operation took when it was
not killed (measured first, in the same test). Runs on SQLite only: the agent's state handling
does not depend on the server's database, which the other e2e tests cover on both.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from sqlalchemy import select as sql_select

from fleettrust.agent.enroll import EnrollmentError, enroll, install, submit_enrollment
from fleettrust.agent.identity import FileDeviceKey, public_key_matches
from fleettrust.agent.manifest import gather_manifest
from fleettrust.agent.state import Identity, StateStore
from fleettrust.storage.models import Certificate
from tests.e2e.conftest import Stack, read_state

ITERATIONS = 20
SEED = 20261125
SYNC_TIMEOUT_S = 30.0

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


class _Lines:
    """Non-blocking line reader over one pipe of a child process."""

    def __init__(self, stream: object) -> None:
        self.fd = stream.fileno()  # type: ignore[attr-defined]
        self.buffer = b""

    def wait_for(self, marker: bytes, deadline: float) -> bool:
        while marker not in self.buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if not ready:
                return False
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return marker in self.buffer
            self.buffer += chunk
        return True


def _run_and_kill(proc: subprocess.Popen[bytes], marker: tuple[str, bytes], delay: float
                  ) -> tuple[str, float]:
    """Wait for ``marker`` on the child's stdout/stderr, sleep ``delay``, SIGKILL.

    Returns ``("killed" | "exited" | "no-marker", seconds from marker to exit/kill)``."""
    stream_name, text = marker
    stream = proc.stdout if stream_name == "stdout" else proc.stderr
    assert stream is not None
    lines = _Lines(stream)
    try:
        if not lines.wait_for(text, time.monotonic() + SYNC_TIMEOUT_S):
            proc.kill()
            proc.wait(10)
            return "no-marker", 0.0
        seen = time.monotonic()
        try:
            proc.wait(timeout=delay)
            return "exited", time.monotonic() - seen
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            return "killed", time.monotonic() - seen
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


def _calibrate(stack: Stack, args: list[str], marker: tuple[str, bytes]) -> float:
    """Seconds from ``marker`` to the end of an un-killed run of the same command."""
    proc = stack.spawn(*args)
    outcome, elapsed = _run_and_kill(proc, marker, 60.0)
    assert outcome == "exited" and proc.returncode == 0, (outcome, proc.returncode)
    return elapsed


def _check_identity(identity: Identity) -> None:
    state = identity.state
    if state.phase == "enrolled":
        assert identity.certificate is not None
        assert public_key_matches(identity.certificate.public_key(), identity.key.public_key())
        assert format(identity.certificate.serial_number, "x") == state.certificate_serial
    assert isinstance(identity.key, FileDeviceKey)
    assert identity.key_path is not None and identity.key_path.stat().st_mode & 0o777 == 0o600


def _serials_of(stack: Stack, device_id: str) -> set[str]:
    with stack.ctx.sessions() as s:
        return set(s.scalars(sql_select(Certificate.serial_hex)
                             .where(Certificate.device_id == device_id)))


def test_sigkill_during_enrollment(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    window = _calibrate(stack, stack.enroll_args(tmp_path / "calibration"), ("stdout", b"READY"))
    outcomes: Counter[str] = Counter()
    recovered_with_new_key = 0
    for i in range(ITERATIONS):
        state_dir = tmp_path / f"device-{i:02d}"
        args = stack.enroll_args(state_dir, f"kill{i}")
        manifest_file = Path(args[args.index("--manifest-file") + 1])
        outcome, _ = _run_and_kill(stack.spawn(*args), ("stdout", b"READY"),
                                   rng.uniform(0.0, window * 1.1))
        assert outcome != "no-marker"
        store = StateStore(state_dir)
        if not store.exists():
            outcomes["nothing"] += 1  # killed before the first state.json: the old state
        else:
            identity = store.load()  # precise StateError on any inconsistency
            _check_identity(identity)
            outcomes[identity.state.phase] += 1
            if identity.state.phase == "enrolled":
                assert identity.state.device_id is not None
                assert identity.state.certificate_serial in _serials_of(
                    stack, identity.state.device_id)
                continue
        # Finish the interrupted enrollment as a factory station re-run would.
        manifest = gather_manifest(override_file=manifest_file)
        request = enroll(state_dir, manifest=manifest, manifest_override_file=manifest_file,
                         gateway_url=stack.gateway.url)
        try:
            response = submit_enrollment(stack.api.url, stack.factory_token, stack.batch_id,
                                         request)
        except EnrollmentError as exc:
            # The server had certified this key but the agent died before installing the
            # answer: the key is burnt (key_reused), a new identity is needed.
            assert "key_reused" in exc.message, exc.message
            recovered_with_new_key += 1
            request = enroll(state_dir, manifest=manifest, manifest_override_file=manifest_file,
                             gateway_url=stack.gateway.url, force=True)
            response = submit_enrollment(stack.api.url, stack.factory_token, stack.batch_id,
                                         request)
        install(state_dir, response)
        _check_identity(StateStore(state_dir).load())
    print(f"enrollment kills: window={window * 1000:.0f} ms outcomes={dict(outcomes)} "
          f"recovered_with_new_key={recovered_with_new_key}")
    assert sum(outcomes.values()) == ITERATIONS
    assert len(outcomes) >= 2, f"the kills should hit different phases: {dict(outcomes)}"
    # one recovered device checks in
    last = tmp_path / f"device-{ITERATIONS - 1:02d}"
    stack.agent(*stack.run_args(last), check=True)


def _kill_loop(stack: Stack, state_dir: Path, marker: tuple[str, bytes], window: float,
               rng: random.Random, *, renewing: bool) -> Counter[str]:
    first = StateStore(state_dir).load().state
    device_id = first.device_id
    assert device_id is not None
    last_generation, last_boot = first.generation, first.boot_counter
    outcomes: Counter[str] = Counter()
    serial = first.certificate_serial
    for _ in range(ITERATIONS):
        outcome, _ = _run_and_kill(stack.spawn(*stack.run_args(state_dir)), marker,
                                   rng.uniform(0.0, window * 1.1))
        assert outcome != "no-marker"
        identity = StateStore(state_dir).load()
        _check_identity(identity)
        state = identity.state
        assert state.phase == "enrolled"
        assert state.device_id == device_id, "the device id never changes"
        assert state.generation >= last_generation, "generation went backwards"
        assert state.boot_counter >= last_boot
        assert state.certificate_serial in _serials_of(stack, device_id)
        if renewing:
            kind = "new-certificate" if state.certificate_serial != serial else "old-certificate"
        else:
            kind = "checked-in" if state.checkins_ok > first.checkins_ok else "not-checked-in"
            assert state.certificate_serial == serial
        outcomes[f"{outcome}/{kind}"] += 1
        serial = state.certificate_serial
        first = state
        last_generation, last_boot = state.generation, state.boot_counter
    return outcomes


def test_sigkill_during_check_in(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    state_dir = tmp_path / "device"
    stack.agent(*stack.enroll_args(state_dir), check=True)
    window = _calibrate(stack, stack.run_args(state_dir), ("stdout", b"READY"))
    outcomes = _kill_loop(stack, state_dir, ("stdout", b"READY"), window, rng, renewing=False)
    print(f"check-in kills: window={window * 1000:.0f} ms outcomes={dict(outcomes)}")
    assert sum(v for k, v in outcomes.items() if k.startswith("killed")) >= ITERATIONS // 2
    after = stack.agent(*stack.run_args(state_dir))
    assert after.returncode == 0, after.stderr


def test_sigkill_during_renewal(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)
    state_dir = tmp_path / "device"
    stack.set_validity(10)  # every certificate expires within 30 days: always asked to renew
    stack.agent(*stack.enroll_args(state_dir), check=True)
    marker = ("stderr", b"renewing certificate")
    window = _calibrate(stack, stack.run_args(state_dir), marker)
    outcomes = _kill_loop(stack, state_dir, marker, window, rng, renewing=True)
    print(f"renewal kills: window={window * 1000:.0f} ms outcomes={dict(outcomes)}")
    assert sum(v for k, v in outcomes.items() if k.startswith("killed")) >= ITERATIONS // 2
    assert any(k.endswith("new-certificate") for k in outcomes), outcomes
    device_id = read_state(state_dir)["device_id"]
    after = stack.agent(*stack.run_args(state_dir))
    assert after.returncode == 0, after.stderr
    assert read_state(state_dir)["device_id"] == device_id
