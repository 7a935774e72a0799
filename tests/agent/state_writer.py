"""An agent-like writer for the SIGKILL tests: loops over every kind of state write forever.

Operations (chosen at random, seeded): a check-in record (``save``), a renewal switch (new key
+ certificate written, one atomic state.json replacement, old files removed), and a full
re-enrollment (``enroll --force`` -> ``enrolling`` state, then ``install``). Certificates come
from the test PKI's fleet CA, exactly as the renewal endpoint would issue them. It never
returns: the test kills it with SIGKILL at a random moment.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import sys
from pathlib import Path

from fleettrust.agent.enroll import enroll, install
from fleettrust.agent.identity import FileDeviceKey
from fleettrust.agent.state import CheckinRecord, RenewalInfo, StateStore, format_time
from fleettrust.pki.manifest import normalize_manifest
from tests.agent.pki_helpers import TestPKI

MANIFEST = normalize_manifest({"cpu_serial": "KILLTEST01", "mac_addresses": ["02:00:00:00:00:09"]})


def writer_loop(state_dir: Path, test_pki: TestPKI, seed: int, ready_fd: int | None) -> None:
    rng = random.Random(seed)
    store = StateStore(state_dir)
    if ready_fd is not None:
        os.write(ready_fd, b"r")
        os.close(ready_fd)
    while True:
        op = rng.choice(("checkin", "checkin", "renew", "renew", "reenroll"))
        now = dt.datetime.now(dt.UTC)
        if op == "reenroll":
            request = enroll(state_dir, manifest=MANIFEST, force=True)
            install(state_dir, test_pki.issue_response(request.csr_pem, request.manifest))
            continue
        with store.locked():
            identity = store.load(verify_chain_to_root=False)
            state = identity.state
            if op == "checkin" or state.phase != "enrolled":
                record = CheckinRecord(at=format_time(now), outcome="ok", http_status=200)
                store.save(state.evolve(last_checkin=record, checkins_ok=state.checkins_ok + 1))
                continue
            new_key = FileDeviceKey.generate()
            assert state.device_id is not None
            _, cert = test_pki.issue_device(new_key.public_key(), device_id=state.device_id)
            renewal = RenewalInfo(count=state.renewal.count + 1,
                                  last_renewed_at=format_time(now),
                                  previous_serial=state.certificate_serial)
            assert identity.root is not None
            store.install_identity(state, key=new_key, key_ref=None, device_id=state.device_id,
                                   certificate=cert, chain=test_pki.chain, root=identity.root,
                                   now=now, renewal=renewal)


if __name__ == "__main__":  # pragma: no cover - manual use: python -m tests.agent.state_writer
    directory = Path(sys.argv[1])
    pki = TestPKI()
    request = enroll(directory, manifest=MANIFEST, force=True)
    install(directory, pki.issue_response(request.csr_pem, request.manifest))
    writer_loop(directory, pki, int(sys.argv[2]) if len(sys.argv) > 2 else 0, None)
