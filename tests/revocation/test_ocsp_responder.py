"""The OCSP responder on a real database: statuses from the certificate rows, the delegated
responder certificate, the pre-signed cache, invalidation by the revocation index across two
"processes" (two service contexts, two indexes, two caches), refresh and credential convergence."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp as cocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID
from sqlalchemy import func, select

from fleettrust.clock import FixedClock
from fleettrust.revocation import ocsp as pure
from fleettrust.revocation import ocsp_responder as responder_mod
from fleettrust.revocation.ocsp_responder import (
    MALFORMED,
    UNAUTHORIZED,
    CachedResponse,
    OcspResponder,
    ensure_responder_credential,
)
from fleettrust.services import hierarchy, issuance
from fleettrust.services import revocation as revocation_service
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import Certificate, CertificateAuthority, ServerCredential
from tests.conftest import Hierarchy, device_csr, manifest
from tests.pkilint_helpers import assert_pkilint_clean_cert, assert_pkilint_clean_ocsp

# --- helpers shared with tests/api/test_ocsp_http.py ---------------------------------------------


@dataclass
class IssuedCert:
    device_id: str
    cert: x509.Certificate
    issuer: x509.Certificate
    ca_id: str


def issuer_of(ctx: ServiceContext, ca_id: str) -> x509.Certificate:
    with ctx.sessions() as s:
        ca = s.get(CertificateAuthority, ca_id)
        assert ca is not None
        assert ca.certificate_der is not None
        return x509.load_der_x509_certificate(ca.certificate_der)


def issue_devices(ctx: ServiceContext, principal: Principal, batch: hierarchy.BatchCreated,
                  n: int) -> list[IssuedCert]:
    reqs = [issuance.IssueRequest(csr=device_csr()[0], manifest=manifest()) for _ in range(n)]
    res = issuance.issue_devices(ctx, principal, batch.batch.id, reqs)
    issuer = issuer_of(ctx, batch.batch.ca_id)
    return [IssuedCert(d.device_id, x509.load_pem_x509_certificate(d.certificate_pem.encode()),
                       issuer, batch.batch.ca_id) for d in res.devices]


def unstored_certificate(ctx: ServiceContext, ca_id: str) -> x509.Certificate:
    """A certificate signed by our CA's key that fleettrust never recorded (-> unknown)."""
    with ctx.sessions() as s:
        ca = s.get(CertificateAuthority, ca_id)
        assert ca is not None
        assert ca.key_id is not None
        key_id = ca.key_id
    issuer = issuer_of(ctx, ca_id)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rogue")]))
               .issuer_name(issuer.subject)
               .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=1))
               .not_valid_after(now + dt.timedelta(days=1)))
    return ctx.signer(key_id).sign_certificate(builder)


def foreign_pair() -> tuple[x509.Certificate, x509.Certificate]:
    """(leaf, issuer) from a CA that has nothing to do with fleettrust."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Foreign CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(key.public_key()).serial_number(7)
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
          .add_extension(x509.BasicConstraints(True, None), True).sign(key, hashes.SHA256()))
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(name).public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(8).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=9)).sign(key, hashes.SHA256()))
    return leaf, ca


def ocsp_request(cert: x509.Certificate, issuer: x509.Certificate,
                 algorithm: hashes.HashAlgorithm | None = None,
                 nonce: bytes | None = None) -> bytes:
    # SHA-1 is what RFC 5019 clients put in CertIDs (an identifier, not a signature)
    alg = algorithm or hashes.SHA1()  # noqa: S303
    b = cocsp.OCSPRequestBuilder().add_certificate(cert, issuer, alg)
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), False)
    return b.build().public_bytes(serialization.Encoding.DER)


def check_signed_by_delegate(der: bytes, issuer: x509.Certificate) -> cocsp.OCSPResponse:
    """Parse a successful response and verify it the way a client does (RFC 6960 §4.2.2.2)."""
    resp = cocsp.load_der_ocsp_response(der)
    assert resp.response_status is cocsp.OCSPResponseStatus.SUCCESSFUL
    (responder,) = resp.certificates
    assert responder.issuer == issuer.subject
    issuer_key = issuer.public_key()
    assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
    responder.verify_directly_issued_by(issuer)
    eku = responder.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.OCSP_SIGNING]
    responder.extensions.get_extension_for_oid(ExtensionOID.OCSP_NO_CHECK)
    ku = responder.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature
    assert not ku.key_cert_sign
    assert resp.responder_key_hash == x509.SubjectKeyIdentifier.from_public_key(
        responder.public_key()).digest
    key = responder.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(hashes.SHA256()))
    return resp


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def responder(ctx: ServiceContext) -> Iterator[OcspResponder]:
    r = OcspResponder(ctx)
    yield r
    r.close()


@pytest.fixture
def devices(ctx: ServiceContext, factory_principal: Principal,
            batch: hierarchy.BatchCreated) -> list[IssuedCert]:
    return issue_devices(ctx, factory_principal, batch, 4)


# --- tests ---------------------------------------------------------------------------------------


def test_statuses_profile_and_cache(ctx: ServiceContext, admin: Principal, fleet: Hierarchy,
                                    responder: OcspResponder, devices: list[IssuedCert]) -> None:
    good, revoked, held, _spare = devices
    issuer = good.issuer
    revocation_service.revoke_device(ctx, admin, revoked.device_id, reason="keyCompromise")
    revocation_service.suspend_device(ctx, admin, held.device_id)

    # good, with SHA-1 and SHA-256 CertIDs
    for alg in (hashes.SHA1(), hashes.SHA256()):  # noqa: S303
        der = ocsp_request(good.cert, issuer, alg)
        assert responder.lookup_post(der) is None  # not seen yet
        answer = responder.resolve(der)
        resp = check_signed_by_delegate(answer.body, issuer)
        assert resp.certificate_status is cocsp.OCSPCertStatus.GOOD
        assert resp.serial_number == good.cert.serial_number
        assert resp.hash_algorithm.name == alg.name
        assert resp.next_update_utc is not None
        assert resp.this_update_utc is not None
        assert resp.next_update_utc - resp.this_update_utc == dt.timedelta(hours=1)
        assert_pkilint_clean_ocsp(answer.body)
        # the same bytes again: served from the cache, identical
        assert responder.lookup_post(der) is answer
        assert responder.resolve(der).body == answer.body

    (responder_cert,) = cocsp.load_der_ocsp_response(answer.body).certificates
    assert_pkilint_clean_cert(responder_cert.public_bytes(serialization.Encoding.PEM))

    # revoked, with time and reason
    answer = responder.resolve(ocsp_request(revoked.cert, issuer))
    resp = check_signed_by_delegate(answer.body, issuer)
    assert resp.certificate_status is cocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.key_compromise
    with ctx.sessions() as s:
        row = s.get(Certificate, format(revoked.cert.serial_number, "x"))
        assert row is not None
        assert row.revoked_at is not None
        assert resp.revocation_time_utc == row.revoked_at.replace(microsecond=0)
    assert_pkilint_clean_ocsp(answer.body)

    # on hold: revoked with reason certificateHold; released: good again
    resp = check_signed_by_delegate(responder.resolve(ocsp_request(held.cert, issuer)).body, issuer)
    assert resp.certificate_status is cocsp.OCSPCertStatus.REVOKED
    assert resp.revocation_reason is x509.ReasonFlags.certificate_hold

    # unknown: signed by our CA key, never recorded
    rogue = unstored_certificate(ctx, good.ca_id)
    answer = responder.resolve(ocsp_request(rogue, issuer, hashes.SHA256()))
    resp = check_signed_by_delegate(answer.body, issuer)
    assert resp.certificate_status is cocsp.OCSPCertStatus.UNKNOWN
    assert answer.status == "unknown"
    assert_pkilint_clean_ocsp(answer.body)

    # a serial issued by another of our CAs is unknown for this issuer
    fleet_issuer = issuer_of(ctx, fleet.fleet_ca_id)
    with ctx.sessions() as s:
        sub_ca = s.scalars(select(Certificate).where(
            Certificate.kind == "ca", Certificate.ca_id == fleet.fleet_ca_id)).first()
        assert sub_ca is not None
        sub_ca_cert = x509.load_der_x509_certificate(sub_ca.der)
    resp = check_signed_by_delegate(
        responder.resolve(ocsp_request(sub_ca_cert, fleet_issuer)).body, fleet_issuer)
    assert resp.certificate_status is cocsp.OCSPCertStatus.GOOD  # the factory CA's own cert
    # the device's serial asked of the fleet CA (which did not issue it)
    wrong_issuer = _seq(_seq(_seq(_seq(pure.encode_cert_id(pure.CertId(
        "sha1", *pure.issuer_hashes(fleet_issuer, "sha1"), serial=good.cert.serial_number))))))
    resp = check_signed_by_delegate(responder.resolve(wrong_issuer).body, fleet_issuer)
    assert resp.certificate_status is cocsp.OCSPCertStatus.UNKNOWN
    # name hash of one CA with the key hash of another: not one of ours
    assert responder.resolve(ocsp_request(good.cert, fleet_issuer)) is UNAUTHORIZED

    # foreign issuer, and our offline root (no key here): unauthorized
    leaf, foreign = foreign_pair()
    assert responder.resolve(ocsp_request(leaf, foreign)) is UNAUTHORIZED
    assert responder.resolve(ocsp_request(issuer_of(ctx, fleet.fleet_ca_id),
                                          fleet.root_cert)) is UNAUTHORIZED
    assert responder.resolve(ocsp_request(good.cert, issuer, hashes.SHA224())) is UNAUTHORIZED
    # garbage
    assert responder.resolve(b"\x30\x03\x02\x01\x00") is MALFORMED
    assert responder.resolve_get("not base64!") is MALFORMED

    # a nonce is accepted, not echoed, and such requests are not remembered byte for byte
    with_nonce = ocsp_request(good.cert, issuer, nonce=b"n" * 16)
    resp = check_signed_by_delegate(responder.resolve(with_nonce).body, issuer)
    assert resp.certificate_status is cocsp.OCSPCertStatus.GOOD
    assert len(resp.extensions) == 0
    assert responder.lookup_post(with_nonce) is None

    # several certificates in one request: every one answered, in order
    req = pure.parse_request(ocsp_request(good.cert, issuer))
    cids = [req.cert_ids[0],
            pure.CertId("sha1", req.cert_ids[0].issuer_name_hash,
                        req.cert_ids[0].issuer_key_hash, revoked.cert.serial_number),
            pure.CertId("sha1", req.cert_ids[0].issuer_name_hash,
                        req.cert_ids[0].issuer_key_hash, rogue.serial_number)]
    body = b"".join(_seq(pure.encode_cert_id(c)) for c in cids)
    multi = _seq(_seq(_seq(body)))
    answer = responder.resolve(multi)
    resp = check_signed_by_delegate(answer.body, issuer)
    assert [r.certificate_status for r in resp.responses] == [
        cocsp.OCSPCertStatus.GOOD, cocsp.OCSPCertStatus.REVOKED, cocsp.OCSPCertStatus.UNKNOWN]
    assert_pkilint_clean_ocsp(answer.body)

    # GET form is cached under its path segment
    import base64
    segment = base64.b64encode(ocsp_request(good.cert, issuer)).decode()
    first = responder.resolve_get(segment)
    assert responder.lookup_get(segment) is first

    # one responder certificate per CA was made, as a ServerCredential + certificates row
    with ctx.sessions() as s:
        creds = s.scalars(select(ServerCredential).where(
            ServerCredential.purpose == f"ocsp:{good.ca_id}")).all()
        assert len(creds) == 1
        assert s.get(Certificate, creds[0].names["serial"]) is not None
        assert creds[0].key_id.startswith("file:ocsp-")
        assert ctx.settings.keys_dir.joinpath(creds[0].key_id[5:] + ".pem").read_bytes() \
            .startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")


def _seq(content: bytes) -> bytes:
    n = len(content)
    if n < 128:
        return b"\x30" + bytes([n]) + content
    size = (n.bit_length() + 7) // 8
    return b"\x30" + bytes([0x80 | size]) + n.to_bytes(size, "big") + content


def _status_of(answer: CachedResponse | None) -> str | None:
    return None if answer is None else answer.status


def test_revocation_reaches_both_processes_within_a_second(
        ctx: ServiceContext, admin: Principal, devices: list[IssuedCert]) -> None:
    """Two responders with their own context, index and cache (= two server processes on one
    database). A revocation through the service layer (process A) is served by both, from the
    hot path, within one second; so is the release of a hold."""
    ctx_b = ServiceContext.create(ctx.settings)
    a = OcspResponder(ctx).start()
    b = OcspResponder(ctx_b).start()
    try:
        target, held = devices[0], devices[1]
        reqs = {d.device_id: ocsp_request(d.cert, d.issuer) for d in (target, held)}
        for r in (a, b):
            for der in reqs.values():
                assert r.resolve(der).status == "good"
                assert _status_of(r.lookup_post(der)) == "good"

        def wait_for(der: bytes, status: str, reason: x509.ReasonFlags | None) -> float:
            start = time.monotonic()
            pending = {"a": a, "b": b}
            while pending and time.monotonic() - start < 1.0:
                for name, r in list(pending.items()):
                    # what a client would get: hot path, else the slow path
                    answer = r.lookup_post(der) or r.resolve(der)
                    if answer.status == status:
                        parsed = cocsp.load_der_ocsp_response(answer.body)
                        if status == "revoked":
                            assert parsed.revocation_reason is reason
                        del pending[name]
                time.sleep(0.01)
            assert not pending, f"{sorted(pending)} still not {status} after 1 s"
            # and the background re-signing puts the new answer back on the hot path
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if all(_status_of(r.lookup_post(der)) == status for r in (a, b)):
                    return time.monotonic() - start
                time.sleep(0.01)
            raise AssertionError("re-signed answer not cached")

        revocation_service.revoke_device(ctx, admin, target.device_id, reason="keyCompromise")
        wait_for(reqs[target.device_id], "revoked", x509.ReasonFlags.key_compromise)
        revocation_service.suspend_device(ctx_b, admin, held.device_id)
        wait_for(reqs[held.device_id], "revoked", x509.ReasonFlags.certificate_hold)
        revocation_service.release_device(ctx, admin, held.device_id)
        wait_for(reqs[held.device_id], "good", None)
        assert a.stats["invalidated"] >= 3
        assert b.stats["invalidated"] >= 3
    finally:
        a.close()
        b.close()
        ctx_b.close()


def test_refresh_at_half_life_and_eviction(ctx: ServiceContext, devices: list[IssuedCert],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    fake = [1000.0]
    monkeypatch.setattr(responder_mod, "_monotonic", lambda: fake[0])
    clock = FixedClock(dt.datetime.now(dt.UTC).replace(microsecond=0))
    ctx.clock = clock
    r = OcspResponder(ctx, sync_index=False)
    hot, cold = devices[0], devices[1]
    hot_req, cold_req = (ocsp_request(d.cert, d.issuer) for d in (hot, cold))
    first = r.resolve(hot_req)
    r.resolve(cold_req)
    rogue_req = ocsp_request(unstored_certificate(ctx, hot.ca_id), hot.issuer)
    assert r.resolve(rogue_req).status == "unknown"
    assert r.cache_size() == 3
    # 10 minutes on: nothing due; the unknown answer (60 s) is dropped
    fake[0] += 600
    clock.advance(seconds=600)
    assert r.lookup_post(hot_req) is first
    r.refresh_now()
    assert r.cache_size() == 2
    assert r.lookup_post(rogue_req) is None
    # 30 minutes after signing (half of the 1 h validity): the answer asked for since is
    # re-signed with a fresh thisUpdate, the one nobody asked for is dropped
    fake[0] += 1200
    clock.advance(seconds=1200)
    r.refresh_now()
    again = r.lookup_post(hot_req)
    assert again is not None
    assert again is not first
    assert again.this_update == first.this_update + dt.timedelta(seconds=1800)  # type: ignore[operator]
    assert r.lookup_post(cold_req) is None
    assert r.cache_size() == 1
    # past 90 % of the validity without refresh (thread stopped) the hot path refuses it
    fake[0] += 3300
    assert r.lookup_post(hot_req) is None
    assert r.resolve(hot_req).status == "good"
    r.close()


def test_responder_credential_race_and_rotation(ctx: ServiceContext, fleet: Hierarchy,
                                                batch: hierarchy.BatchCreated) -> None:
    ca_id = batch.batch.ca_id
    contexts = [ServiceContext.create(ctx.settings) for _ in range(4)]
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(contexts))

    def worker(c: ServiceContext) -> None:
        try:
            barrier.wait()
            cred = ensure_responder_credential(c, ca_id)
            assert cred is not None
            results.append(cred.credential_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert not errors, errors
        assert len(results) == 4
        assert len(set(results)) == 1
        with ctx.sessions() as s:
            assert s.scalar(select(func.count()).select_from(ServerCredential).where(
                ServerCredential.purpose == f"ocsp:{ca_id}")) == 1
            assert s.scalar(select(func.count()).select_from(Certificate).where(
                Certificate.kind == "ocsp")) == 1
        # every key file left in the store belongs to a credential (no orphans from the race)
        assert len(list(ctx.settings.keys_dir.glob("ocsp-*.pem"))) == 1

        # rotation: 24 days later (< 7 days left of 30) a new one is made, and a responder
        # that still holds the old one adopts it at its next credential check
        a = OcspResponder(ctx, sync_index=False)
        old = a.credential(ca_id)
        assert old is not None
        assert old.credential_id == results[0]
        later = FixedClock(dt.datetime.now(dt.UTC) + dt.timedelta(days=24))
        contexts[0].clock = later
        new = ensure_responder_credential(contexts[0], ca_id)
        assert new is not None
        assert new.credential_id != old.credential_id
        assert new.not_after > old.not_after
        other = ensure_responder_credential(contexts[1], ca_id)
        assert other is not None
        assert other.credential_id == new.credential_id
        a._check_credentials()
        assert a.credential(ca_id).credential_id == new.credential_id  # type: ignore[union-attr]
        a.close()
    finally:
        for c in contexts:
            c.close()


def test_no_credential_for_revoked_or_external_ca(ctx: ServiceContext, admin: Principal,
                                                  fleet: Hierarchy) -> None:
    with ctx.transaction() as s:
        ca = s.get(CertificateAuthority, fleet.fleet_ca_id)
        assert ca is not None
        ca.status = "revoked"
    assert ensure_responder_credential(ctx, fleet.fleet_ca_id) is None
    assert ensure_responder_credential(ctx, "ca_doesnotexist") is None
    with ctx.sessions() as s:
        root = s.scalars(select(CertificateAuthority).where(
            CertificateAuthority.kind == "root")).first()
        assert root is not None
        root_id = root.id
    assert ensure_responder_credential(ctx, root_id) is None  # offline root: no key here
