"""SIGKILL at random moments during state writes, renewal switches and re-enrollment.

A forked child runs tests/agent/state_writer.py's loop (check-in records, renewal switches,
enroll --force + install); the parent kills it with SIGKILL after a seeded random delay and then
checks that the state directory loads — schema, files, key matches certificate, chain reaches
the pinned root — i.e. it holds either the old or the new identity, never a mix. It then does
what the next agent start does (cleanup of leftovers) and checks the state is unchanged.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from fleettrust.agent.identity import FileDeviceKey, public_key_matches
from fleettrust.agent.state import StateStore
from tests.agent.pki_helpers import TestPKI
from tests.agent.state_writer import MANIFEST, writer_loop

ITERATIONS = 60
SEED = 20261124


def _spawn(state_dir: Path, test_pki: TestPKI, seed: int) -> int:
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(ready_r)
        try:
            writer_loop(state_dir, test_pki, seed, ready_w)
        finally:
            os._exit(1)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"r"
    os.close(ready_r)
    return pid


def test_sigkill_never_leaves_a_corrupt_state(tmp_path: Path) -> None:
    from fleettrust.agent.enroll import enroll, install

    test_pki = TestPKI()
    state_dir = tmp_path / "device"
    request = enroll(state_dir, manifest=MANIFEST)
    install(state_dir, test_pki.issue_response(request.csr_pem, request.manifest))
    rng = random.Random(SEED)
    store = StateStore(state_dir)
    last_generation = initial_generation = store.read().generation
    phases: set[str] = set()
    leftovers_seen = 0
    for iteration in range(ITERATIONS):
        pid = _spawn(state_dir, test_pki, seed=SEED + iteration)
        time.sleep(rng.uniform(0.0, 0.06))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status), f"iteration {iteration}: writer exited by itself"
        assert os.WTERMSIG(status) == signal.SIGKILL

        identity = store.load()  # raises StateError with a precise code on any inconsistency
        state = identity.state
        phases.add(state.phase)
        assert state.generation >= last_generation, "generation went backwards"
        last_generation = state.generation
        if state.phase == "enrolled":
            assert identity.certificate is not None
            assert public_key_matches(identity.certificate.public_key(),
                                      identity.key.public_key())
            assert isinstance(identity.key, FileDeviceKey)
            assert identity.key_path is not None
            assert identity.key_path.stat().st_mode & 0o777 == 0o600
        # what the next writer does on start: remove leftovers, state stays loadable
        with store.locked():
            leftovers_seen += len(store.cleanup(state))
        after = store.load()
        assert after.state == state
        names = {p.name for p in state_dir.iterdir()}
        assert state.referenced_files() <= names
    # the seeded schedule must have hit the interesting cases
    assert "enrolled" in phases
    assert last_generation > initial_generation  # the writer did get to write
    print(f"phases={sorted(phases)} leftovers_removed={leftovers_seen} "
          f"generation={last_generation}")


@pytest.mark.parametrize("payload", [b"", b"{", b"{\"format\": 1}", b"\x00" * 10])
def test_truncated_or_garbage_state_is_reported_precisely(tmp_path: Path, payload: bytes) -> None:
    from fleettrust.agent.state import StateError

    (tmp_path / "state.json").write_bytes(payload)
    with pytest.raises(StateError) as info:
        StateStore(tmp_path).load()
    assert info.value.code in ("state_corrupt", "state_schema_invalid")
