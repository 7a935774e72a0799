"""The sequencer and its storage on real databases (SQLite file and PostgreSQL schema).

* Real operations (ceremony, factory, batch, issuance, renewal, claim, revocation) produce audit
  events; the sequencer logs each exactly once, in id order, with the certificates it issued;
  every stored certificate is in the log; the recomputed tree equals what was signed.
* Proofs served from the database equal an in-memory tree's, for many sizes.
* Holes in audit ids: a transaction still in flight holds the sequencer back (PostgreSQL); a
  rolled-back one becomes a gap leaf once every writer of the time has ended; an id skipped on
  SQLite becomes a gap leaf at once.
* Two OS processes writing events and sequencing at the same time: no gaps, no duplicates.
* Audit events are never modified (their triggers still refuse it), log tables are append-only,
  and tampering with a leaf behind the triggers' back is found by ``check_log``.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import multiprocessing as mp
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import func, insert, select, text
from sqlalchemy.exc import DBAPIError

from fleettrust.ledger import entry as entries
from fleettrust.ledger import merkle
from fleettrust.ledger.sth import verify_sth
from fleettrust.services import audit, claims, hierarchy, ledger, revocation
from fleettrust.services.auth import SYSTEM, Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.ledger_models import LogCertificate, LogLeaf, LogSth
from fleettrust.storage.models import AuditEvent, Certificate
from tests.conftest import Hierarchy, make_principal
from tests.ledger.conftest import issue, renew


def _leaves(ctx: ServiceContext) -> list[LogLeaf]:
    with ctx.sessions() as s:
        return list(s.scalars(select(LogLeaf).order_by(LogLeaf.leaf_index)))


def _audit_rows(ctx: ServiceContext) -> list[tuple[Any, ...]]:
    with ctx.sessions() as s:
        return [tuple(r) for r in s.execute(select(AuditEvent.__table__).order_by(AuditEvent.id))]


def _assert_complete(ctx: ServiceContext) -> list[LogLeaf]:
    """Every audit id accounted for once, in order; the tree equals what was signed."""
    leaves = _leaves(ctx)
    assert [leaf.leaf_index for leaf in leaves] == list(range(len(leaves)))
    covered: list[int] = []
    for leaf in leaves:
        body = entries.decode_entry(leaf.data)
        assert merkle.leaf_hash(leaf.data) == leaf.leaf_hash
        if leaf.kind == entries.KIND_GAP:
            covered.extend(range(body["first_id"], body["last_id"] + 1))
        else:
            assert body["event"]["id"] == leaf.audit_event_id
            covered.append(leaf.audit_event_id)
    assert covered == list(range(1, len(covered) + 1))  # in id order, no hole, no repeat
    with ctx.sessions() as s:
        ids = list(s.scalars(select(AuditEvent.id).order_by(AuditEvent.id)))
    assert set(ids) <= set(covered)
    assert ledger.unlogged(ctx) == {"events": [], "certificates": []}
    check = ledger.check_log(ctx)
    assert check.ok, check.problems
    return leaves


def test_real_operations_are_logged_with_their_certificates(
        ctx: ServiceContext, admin: Principal, factory_principal: Principal,
        factory: hierarchy.FactoryCreated) -> None:
    own = hierarchy.create_batch(
        ctx, factory_principal, factory.factory.id, name="B-own-ca", product_model="TH-100",
        hardware_revision="r2", planned_size=10, manufactured_on=dt.date(2026, 11, 20),
        own_ca=True)
    devices = issue(ctx, factory_principal, own, 3)
    renewed = renew(ctx, devices[0])
    before = _audit_rows(ctx)
    res = ledger.sequence_once(ctx)
    assert res.appended == len(before)
    assert res.sth is not None
    assert not res.more
    assert _audit_rows(ctx) == before  # the sequencer only reads audit events
    leaves = _assert_complete(ctx)
    # every certificate fleettrust stored is carried by exactly one first leaf, DER included
    with ctx.sessions() as s:
        certs = {c.serial_hex: bytes(c.der) for c in s.scalars(select(Certificate))}
        logged = {c.serial_hex: c for c in s.scalars(select(LogCertificate))}
    assert set(certs) == set(logged)
    assert {devices[1].serial, renewed.serial} <= set(certs)
    for serial, der in certs.items():
        body = entries.decode_entry(leaves[logged[serial].leaf_index].data)
        (c,) = [c for c in body["certificates"] if c["serial"] == serial]
        assert base64.b64decode(c["der"]) == der
        assert logged[serial].cert_sha256 == c["sha256"]
    # the renewal leaf names the device and holds the new certificate
    by_action = {entries.decode_entry(x.data)["event"]["action"]: x for x in leaves}
    ren = by_action["certificate.renewed"]
    assert ren.device_id == devices[0].device_id
    der = base64.b64decode(entries.decode_entry(ren.data)["certificates"][0]["der"])
    assert x509.load_der_x509_certificate(der).serial_number == int(renewed.serial, 16)
    assert by_action["batch.create"].data.count(b'"der"') == 1  # the batch's own CA
    # the signed head verifies with the published key and covers every leaf
    sth = ledger.latest_sth(ctx)
    pem, _ = ledger.public_key_pem(ctx)
    key = serialization.load_pem_public_key(pem)
    verify_sth(sth, key)  # type: ignore[arg-type]
    assert sth.tree_size == len(leaves)
    # nothing new: no new leaves and no new tree head
    again = ledger.sequence_once(ctx)
    assert again.appended == 0
    assert again.sth is None
    assert again.tree_size == len(leaves)


def test_stored_proofs_equal_the_reference_tree(ctx: ServiceContext) -> None:
    sizes = []
    with ctx.transaction() as s:
        for n in (1, 2, 3, 5, 8, 13, 40, 33):
            for i in range(n):
                audit.record(s, SYSTEM, "test.event", "test", f"t{len(sizes)}-{i}",
                             ctx.clock.now(), n=i)
            s.flush()
            sizes.append(n)
    total = 0
    heads = []
    # small batches: many appends over many frontier shapes, one tree head each
    while True:
        res = ledger.sequence_once(ctx, max_batch=7)
        if res.sth is not None:
            heads.append(res.sth)
        total += res.appended
        if not res.more:
            break
    assert total == sum(sizes)
    tree = merkle.MemoryTree.from_leaf_hashes(x.leaf_hash for x in _leaves(ctx))
    with ctx.sessions() as s:
        store = ledger.LedgerStore(s)
        assert store.size() == tree.size
        for n in range(1, tree.size + 1, 3):
            assert store.root(n) == tree.root(n)
            for i in {0, n // 2, n - 1}:
                assert store.inclusion_proof(i, n) == tree.inclusion_proof(i, n)
            for m in {1, n // 3 + 1, n}:
                assert store.consistency_proof(m, n) == tree.consistency_proof(m, n)
        many = store.inclusion_proofs(list(range(tree.size)), tree.size)
        assert all(many[i] == tree.inclusion_proof(i) for i in range(tree.size))
    for a, b in itertools.pairwise(heads):  # every head extends the one before
        p = ledger.consistency_proof(ctx, a.tree_size, b.tree_size)
        merkle.verify_consistency(a.tree_size, b.tree_size, a.root_hash, b.root_hash, p.path)


def _insert_event(s: Any, target: str, **kw: Any) -> None:
    s.execute(insert(AuditEvent).values(
        occurred_at=dt.datetime.now(dt.UTC), actor="system:test", actor_role="system",
        action="test.event", target_type="test", target_id=target, remote_addr=None,
        details={}, **kw))


def test_in_flight_and_rolled_back_ids(ctx: ServiceContext, db_url: str) -> None:
    ledger.sequence_once(ctx)
    base = ledger.leaf_count(ctx)
    if db_url.startswith("sqlite"):
        # SQLite reuses a rolled-back rowid; a hole can only come from an explicit id, and the
        # sequencer (the only writer while it runs) knows at once that it is permanent.
        with ctx.transaction() as s:
            _insert_event(s, "a")
            last = s.scalar(select(func.max(AuditEvent.id)))
            _insert_event(s, "b", id=last + 3)
        res = ledger.sequence_once(ctx)
        assert res.appended == 3  # a, gap(last+1..last+2), b
        gap = entries.decode_entry(_leaves(ctx)[base + 1].data)
        assert gap == {"v": 1, "kind": "gap", "first_id": last + 1, "last_id": last + 2}
        _assert_complete(ctx)
        return
    # PostgreSQL: A takes an id and stays open; B commits a higher id.
    slow = ctx.sessions()
    slow.begin()
    _insert_event(slow, "slow")
    slow.flush()
    with ctx.transaction() as s:
        _insert_event(s, "fast")
    held = ledger.sequence_once(ctx)
    assert held.appended == 0
    assert held.waiting_on_gap is not None
    again = ledger.sequence_once(ctx)  # still open: still waiting, nothing skipped
    assert again.appended == 0
    assert again.waiting_on_gap == held.waiting_on_gap
    slow.commit()
    slow.close()
    done = ledger.sequence_once(ctx)
    assert done.appended == 2
    assert done.waiting_on_gap is None
    targets = [entries.decode_entry(x.data)["event"]["target_id"] for x in _leaves(ctx)[-2:]]
    assert targets == ["slow", "fast"]  # id order, although "fast" committed first
    # now A rolls back after B committed: a gap leaf once A has ended
    slow = ctx.sessions()
    slow.begin()
    _insert_event(slow, "doomed")
    slow.flush()
    with ctx.transaction() as s:
        _insert_event(s, "survivor")
    assert ledger.sequence_once(ctx).waiting_on_gap is not None
    slow.rollback()
    slow.close()
    res = ledger.sequence_once(ctx)
    assert res.appended == 2
    kinds = [(x.kind, entries.decode_entry(x.data)) for x in _leaves(ctx)[-2:]]
    assert kinds[0][0] == "gap"
    assert kinds[0][1]["first_id"] == kinds[0][1]["last_id"]
    assert kinds[1][1]["event"]["target_id"] == "survivor"
    _assert_complete(ctx)


def _writer(data_dir: str, database_url: str, tag: str, rounds: int, start: Any,
            results: Any) -> None:
    """One server process: commit (and sometimes roll back) audit events, sequence in between."""
    from fleettrust.config import Settings
    from fleettrust.services import audit, ledger
    from fleettrust.services.auth import SYSTEM
    from fleettrust.services.context import ServiceContext

    out: dict[str, Any] = {"written": 0, "appended": 0, "errors": []}
    try:
        ctx = ServiceContext.create(Settings(data_dir=Path(data_dir), database_url=database_url))
        start.wait(timeout=60)
        for r in range(rounds):
            try:
                with ctx.transaction() as s:
                    for k in range(1 + r % 4):
                        audit.record(s, SYSTEM, "test.event", "test", f"{tag}-{r}-{k}",
                                     ctx.clock.now(), round=r)
                    s.flush()
                    if r % 7 == 3:
                        raise RuntimeError("roll back")  # leaves a hole in PostgreSQL's ids
                out["written"] += 1 + r % 4
            except RuntimeError:
                pass
            out["appended"] += ledger.sequence_once(ctx, max_batch=5).appended
        ctx.close()
    except Exception as exc:
        out["errors"].append(repr(exc))
    results.put(out)


def test_two_processes_sequence_without_gaps_or_duplicates(ctx: ServiceContext,
                                                           db_url: str) -> None:
    ledger.sequence_once(ctx)  # the log key exists before the race (either may create it)
    spawn = mp.get_context("spawn")
    start = spawn.Event()
    results = spawn.Queue()
    procs = [spawn.Process(target=_writer, args=(str(ctx.settings.data_dir), db_url, tag, 40,
                                                 start, results)) for tag in ("p1", "p2")]
    for p in procs:
        p.start()
    start.set()
    outs = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(not o["errors"] for o in outs), outs
    ledger.sequence_pending(ctx, timeout=30)
    leaves = _assert_complete(ctx)
    written = sum(o["written"] for o in outs)
    events = [x for x in leaves if x.kind == "audit_event"]
    targets = [entries.decode_entry(x.data)["event"]["target_id"] for x in events]
    assert len([t for t in targets if t.startswith(("p1-", "p2-"))]) == written
    assert len(set(targets)) == len(targets)
    assert sum(o["appended"] for o in outs) > 0  # both processes really sequenced
    with ctx.sessions() as s:
        heads = list(s.scalars(select(LogSth).order_by(LogSth.id)))
    assert [h.tree_size for h in heads] == sorted(h.tree_size for h in heads)
    assert [h.timestamp_ms for h in heads] == sorted(h.timestamp_ms for h in heads)


def test_audit_and_log_rows_cannot_be_changed_and_tampering_is_found(
        ctx: ServiceContext, admin: Principal, fleet: Hierarchy, db_url: str) -> None:
    with ctx.transaction() as s:  # with the fleet's events: nodes and a logged certificate
        audit.record(s, admin, "test.event", "test", "w", ctx.clock.now())
        audit.record(s, admin, "test.event", "test", "x", ctx.clock.now())
    ledger.sequence_once(ctx)
    for stmt in ("UPDATE audit_events SET actor = 'mallory'", "DELETE FROM audit_events",
                 "UPDATE log_leaves SET data = data", "DELETE FROM log_leaves",
                 "UPDATE log_nodes SET hash = hash", "DELETE FROM log_sths",
                 "UPDATE log_certificates SET leaf_index = 0"):
        with pytest.raises(DBAPIError, match="append-only"), ctx.transaction() as s:
            s.execute(text(stmt))
    leaves = _leaves(ctx)
    target = leaves[-1]
    forged = target.data.replace(b'"target_id":"x"', b'"target_id":"y"')
    assert forged != target.data
    # someone with table-owner rights goes around the triggers
    with ctx.transaction() as s:
        if db_url.startswith("sqlite"):
            s.execute(text("DROP TRIGGER log_leaves_no_update"))
        else:
            s.execute(text("ALTER TABLE log_leaves DISABLE TRIGGER log_leaves_append_only"))
        s.execute(text("UPDATE log_leaves SET data = :d WHERE leaf_index = :i"),
                  {"d": forged, "i": target.leaf_index})
    check = ledger.check_log(ctx)
    assert not check.ok
    assert any(f"leaf {target.leaf_index}: stored data hashes to" in p for p in check.problems)
    # and if the leaf hash is rewritten too, the signed root no longer matches
    with ctx.transaction() as s:
        s.execute(text("UPDATE log_leaves SET leaf_hash = :h WHERE leaf_index = :i"),
                  {"h": merkle.leaf_hash(forged), "i": target.leaf_index})
    check = ledger.check_log(ctx)
    assert any("signs root" in p for p in check.problems), check.problems


def test_device_history_in_order_with_valid_proofs(
        ctx: ServiceContext, admin: Principal, factory_principal: Principal,
        batch: hierarchy.BatchCreated) -> None:
    from fleettrust.ledger import verify as lv
    from fleettrust.ledger.sth import InclusionProof, SignedTreeHead, load_public_key

    dev, other = issue(ctx, factory_principal, batch, 2)
    renewed = renew(ctx, dev)
    code = claims.create_claim_code(ctx, admin, dev.device_id).code
    owner = make_principal(ctx, "device-owner", "olga")
    claims.claim_device(ctx, owner, code)
    revocation.revoke_device(ctx, admin, dev.device_id, "keyCompromise")
    ledger.sequence_pending(ctx)
    hist = ledger.device_history(ctx, admin, dev.device_id)
    actions = [e["entry"]["event"]["action"] for e in hist["events"]]
    assert actions[:2] == ["device.manufactured", "certificate.renewed"]
    assert "claim_code.create" in actions
    assert "device.claim" in actions
    assert actions.index("device.claim") < actions.index("revocation.device")
    assert actions.count("certificate.revoked") == 2  # both certificates of the device
    idx = [e["leaf_index"] for e in hist["events"]]
    assert idx == sorted(idx)
    assert all(e["entry"]["event"]["target_id"] != other.device_id for e in hist["events"])
    serials = {c["serial"] for e in hist["events"] for c in e["entry"].get("certificates", [])}
    assert serials == {dev.serial, renewed.serial}
    key = load_public_key(ledger.public_key_pem(ctx)[0])
    head = SignedTreeHead.from_json(hist["sth"])
    for e in hist["events"]:
        lv.verify_inclusion(head, InclusionProof.from_json(e["inclusion_proof"]), e, key)
    assert hist["pending"] == []
    # the owner sees it, another owner does not; an event not yet sequenced is pending
    assert ledger.device_history(ctx, owner, dev.device_id)["events"]
    stranger = make_principal(ctx, "device-owner", "sam")
    with pytest.raises(Exception, match="not found"):
        ledger.device_history(ctx, stranger, dev.device_id)
    claims.create_claim_code(ctx, admin, other.device_id)
    revocation.revoke_device(ctx, admin, other.device_id)
    pending = ledger.device_history(ctx, admin, other.device_id)["pending"]
    assert [p["action"] for p in pending] == ["claim_code.create", "revocation.device"]
