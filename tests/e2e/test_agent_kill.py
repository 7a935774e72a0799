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

import itertools
import os
import random
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
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
READY = ("stdout", b"READY")
KILL_SPAN = 1.25  # kill delays are drawn from [0, KILL_SPAN x the un-killed duration]

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


_outputs = itertools.count()


def _run_and_kill(stack: Stack, args: list[str], marker: tuple[str, bytes], delay: float
                  ) -> tuple[str, float]:
    """Start an agent, wait for ``marker`` in its stdout/stderr, let it run ``delay`` more
    seconds, then SIGKILL it. Returns ``("killed" | "exited", seconds after the marker)``."""
    zygote = stack.zygote()
    n = next(_outputs)
    out, err = stack.tmp / f"agent-{n}.out", stack.tmp / f"agent-{n}.err"
    pid = zygote.start(args, out, err)
    watched = out if marker[0] == "stdout" else err
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    status: int | None = None
    while status is None:
        if watched.exists() and marker[1] in watched.read_bytes():
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            zygote.wait(None)
            raise AssertionError(f"no {marker!r} from the agent within {SYNC_TIMEOUT_S} s: "
                                 f"{err.read_text() if err.exists() else ''}")
        status = zygote.wait(0.0005)
    if status is not None:  # finished before the marker: only allowed without a kill
        raise AssertionError(f"agent exited ({status}) before {marker!r}: {err.read_text()}")
    seen = time.monotonic()
    status = zygote.wait(delay)
    if status is not None:
        assert os.WIFEXITED(status), status
        code = os.WEXITSTATUS(status)
        assert code == 0, f"agent exited {code}: {err.read_text()}"
        return "exited", time.monotonic() - seen
    os.kill(pid, signal.SIGKILL)
    elapsed = time.monotonic() - seen
    status = zygote.wait(None)
    assert status is not None
    if os.WIFEXITED(status):  # it finished between the timeout and the kill
        assert os.WEXITSTATUS(status) == 0, err.read_text()
        return "exited", elapsed
    assert os.WIFSIGNALED(status), status
    assert os.WTERMSIG(status) == signal.SIGKILL, status
    return "killed", elapsed


def _calibrate(stack: Stack, make_args: Callable[[int], list[str]], marker: tuple[str, bytes],
               runs: int = 3) -> float:
    """Seconds from ``marker`` to the end of un-killed runs of the command (median)."""
    times: list[float] = []
    for run in range(runs):
        outcome, elapsed = _run_and_kill(stack, make_args(run), marker, 60.0)
        assert outcome == "exited", outcome
        times.append(elapsed)
    return statistics.median(times)


def _check_identity(identity: Identity) -> None:
    state = identity.state
    if state.phase == "enrolled":
        assert identity.certificate is not None
        assert public_key_matches(identity.certificate.public_key(), identity.key.public_key())
        assert format(identity.certificate.serial_number, "x") == state.certificate_serial
    assert isinstance(identity.key, FileDeviceKey)
    assert identity.key_path is not None
    assert identity.key_path.stat().st_mode & 0o777 == 0o600


def _serials_of(stack: Stack, device_id: str) -> set[str]:
    with stack.ctx.sessions() as s:
        return set(s.scalars(sql_select(Certificate.serial_hex)
                             .where(Certificate.device_id == device_id)))


def test_sigkill_during_enrollment(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(SEED)
    markers = [READY, ("stdout", b"enrollment request written")]
    windows = []
    for which, marker in enumerate(markers):
        def calibration_args(n: int, which: int = which) -> list[str]:
            return stack.enroll_args(tmp_path / f"calibration-{which}-{n}")

        windows.append(_calibrate(stack, calibration_args, marker))
    outcomes: Counter[str] = Counter()
    kills: Counter[str] = Counter()
    recovered_with_new_key = 0
    for i in range(ITERATIONS):
        state_dir = tmp_path / f"device-{i:02d}"
        args = stack.enroll_args(state_dir, f"kill{i}")
        manifest_file = Path(args[args.index("--manifest-file") + 1])
        which = i % len(markers)
        outcome, _ = _run_and_kill(stack, args, markers[which],
                                   rng.uniform(0.0, windows[which] * KILL_SPAN))
        kills[outcome] += 1
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
            assert "key_reused" in exc.message, exc.message  # noqa: PT017
            recovered_with_new_key += 1
            request = enroll(state_dir, manifest=manifest, manifest_override_file=manifest_file,
                             gateway_url=stack.gateway.url, force=True)
            response = submit_enrollment(stack.api.url, stack.factory_token, stack.batch_id,
                                         request)
        install(state_dir, response)
        _check_identity(StateStore(state_dir).load())
    print(f"enrollment kills: windows={_ms(windows)} {dict(kills)} "
          f"states={dict(outcomes)} recovered_with_new_key={recovered_with_new_key}")
    assert sum(outcomes.values()) == ITERATIONS
    assert kills["killed"] >= ITERATIONS // 2
    assert len(outcomes) >= 2, f"the kills should hit different phases: {dict(outcomes)}"
    # one recovered device checks in
    last = tmp_path / f"device-{ITERATIONS - 1:02d}"
    stack.agent(*stack.run_args(last), check=True)


def _kill_loop(stack: Stack, state_dir: Path, markers: list[tuple[str, bytes]], rng: random.Random,
               *, renewing: bool) -> tuple[list[float], Counter[str]]:
    windows = [_calibrate(stack, lambda _: stack.run_args(state_dir), m) for m in markers]
    first = StateStore(state_dir).load().state
    device_id = first.device_id
    assert device_id is not None
    last_generation, last_boot = first.generation, first.boot_counter
    outcomes: Counter[str] = Counter()
    serial = first.certificate_serial
    for i in range(ITERATIONS):
        which = i % len(markers)
        outcome, _ = _run_and_kill(stack, stack.run_args(state_dir), markers[which],
                                   rng.uniform(0.0, windows[which] * KILL_SPAN))
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
            kind = ("checked-in" if state.checkins_ok > first.checkins_ok else
                    "booted" if state.boot_counter > first.boot_counter else "untouched")
            assert state.certificate_serial == serial
        outcomes[f"{outcome}/{kind}"] += 1
        serial = state.certificate_serial
        first = state
        last_generation, last_boot = state.generation, state.boot_counter
    return windows, outcomes


def _ms(windows: list[float]) -> list[int]:
    return [round(w * 1000) for w in windows]


def test_sigkill_during_check_in(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(SEED + 1)
    state_dir = tmp_path / "device"
    stack.agent(*stack.enroll_args(state_dir), check=True)
    windows, outcomes = _kill_loop(stack, state_dir, [READY, ("stderr", b"agent started")], rng,
                                   renewing=False)
    print(f"check-in kills: windows={_ms(windows)} ms outcomes={dict(outcomes)}")
    assert sum(v for k, v in outcomes.items() if k.startswith("killed")) >= ITERATIONS // 2
    after = stack.agent(*stack.run_args(state_dir))
    assert after.returncode == 0, after.stderr


def test_sigkill_during_renewal(stack: Stack, tmp_path: Path) -> None:
    rng = random.Random(SEED + 2)
    state_dir = tmp_path / "device"
    stack.set_validity(10)  # every certificate expires within 30 days: always asked to renew
    stack.agent(*stack.enroll_args(state_dir), check=True)
    windows, outcomes = _kill_loop(stack, state_dir, [("stderr", b"renewing certificate")], rng,
                                   renewing=True)
    print(f"renewal kills: windows={_ms(windows)} ms outcomes={dict(outcomes)}")
    assert sum(v for k, v in outcomes.items() if k.startswith("killed")) >= ITERATIONS // 2
    assert any(k.endswith("new-certificate") for k in outcomes), outcomes
    device_id = read_state(state_dir)["device_id"]
    after = stack.agent(*stack.run_args(state_dir))
    assert after.returncode == 0, after.stderr
    assert read_state(state_dir)["device_id"] == device_id
