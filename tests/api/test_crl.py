"""CRLs end to end: served over HTTP, lint-clean (pkilint), verified by OpenSSL, and OpenSSL's
own revocation checking (-crl_check / -crl_check_all / -use_deltas) agreeing with fleettrust
for revoked and good devices under a factory CA and under a batch CA."""

from __future__ import annotations

import base64
import datetime as dt
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from fleettrust import ceremony
from fleettrust.api.app import create_app
from fleettrust.api.crl_routes import public_router
from fleettrust.revocation.crl_publisher import CrlPublisher
from fleettrust.revocation.models import CrlDocument
from fleettrust.services import hierarchy
from fleettrust.services import revocation as rev
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import CertificateAuthority, CrlState
from tests.conftest import ROOT_PASSPHRASE, Hierarchy, make_token
from tests.pkilint_helpers import assert_pkilint_clean_crl
from tests.revocation.revocation_support import (
    AppServer,
    Issued,
    crl_app,
    crl_pem,
    issue,
    openssl,
    pem,
    write,
)


@dataclass
class World:
    client: httpx.Client
    token: str
    fleet: Hierarchy
    factory: hierarchy.FactoryCreated
    own: hierarchy.BatchCreated
    plain_revoked: Issued
    plain_good: Issued
    own_revoked: Issued
    own_good: Issued


@pytest.fixture
def world(ctx: ServiceContext, admin: Principal, fleet: Hierarchy,
          factory: hierarchy.FactoryCreated, batch: hierarchy.BatchCreated) -> Iterator[World]:
    own = hierarchy.create_batch(ctx, admin, factory.factory.id, name="B-own",
                                 product_model="TH-100", hardware_revision="r2", planned_size=10,
                                 manufactured_on=dt.date(2026, 11, 20), own_ca=True)
    p1, p2 = issue(ctx, admin, batch.batch.id, 2)
    o1, o2 = issue(ctx, admin, own.batch.id, 2)
    rev.revoke_device(ctx, admin, p1.device_id, "keyCompromise")
    rev.revoke_device(ctx, admin, o1.device_id, "superseded")
    with AppServer(crl_app(ctx)) as client:
        yield World(client, make_token(ctx, "admin", "ops"), fleet, factory, own, p1, p2, o1, o2)


def _get(w: World, path: str) -> bytes:
    r = w.client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pkix-crl"
    return r.content


def _upload_root_crl(w: World, revoke: list[tuple[int, str]] | None = None) -> bytes:
    crl = ceremony.root_crl(w.fleet.root_dir, passphrase=ROOT_PASSPHRASE,
                            now=dt.datetime.now(dt.UTC), revoke=revoke)
    der = crl.public_bytes(serialization.Encoding.DER)
    r = w.client.post("/v1/crl/root", json={"crl": base64.b64encode(der).decode()},
                      headers={"Authorization": f"Bearer {w.token}"})
    assert r.status_code == 200, r.text
    return der


def _shard(cert: x509.Certificate, ctx: ServiceContext) -> int:
    return cert.serial_number % ctx.settings.crl_shards


def _serials(der: bytes) -> dict[int, str | None]:
    out: dict[int, str | None] = {}
    for rc in x509.load_der_x509_crl(der):
        try:
            out[rc.serial_number] = rc.extensions.get_extension_for_class(
                x509.CRLReason).value.reason.value
        except x509.ExtensionNotFound:
            out[rc.serial_number] = None
    return out


def test_every_profile_is_lint_clean_and_signed(world: World, ctx: ServiceContext,
                                                tmp_path: Path) -> None:
    w = world
    factory_ca, batch_ca = w.factory.ca.id, w.own.batch.ca_id
    leaf = w.plain_revoked.certificate
    # The shard URL in the certificate's CRL DP is exactly the shard CRL's IDP.
    cdp = leaf.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    cdp_url = cdp[0].full_name[0].value
    shard = _shard(leaf, ctx)
    assert cdp_url == f"{ctx.settings.base_url}/crl/{factory_ca}/{shard}.crl"
    docs = {
        "shard": _get(w, f"/crl/{factory_ca}/{shard}.crl"),
        "shard-delta": _get(w, f"/crl/{factory_ca}/{shard}-delta.crl"),
        "ca-level": _get(w, f"/crl/{factory_ca}.crl"),
        "ca-delta": _get(w, f"/crl/{factory_ca}/delta.crl"),
        "batch-ca-level": _get(w, f"/crl/{batch_ca}.crl"),
        "root": _upload_root_crl(w),
    }
    docs["root-served"] = _get(w, f"/crl/{w.fleet.root_cert and _root_id(ctx)}.crl")
    assert docs["root-served"] == docs["root"]
    for name, der in docs.items():
        assert_pkilint_clean_crl(der), name
    shard_crl = x509.load_der_x509_crl(docs["shard"])
    idp = shard_crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    assert idp.critical
    assert idp.value.only_contains_user_certs
    assert idp.value.full_name[0].value == cdp_url  # type: ignore[index]
    fresh = shard_crl.extensions.get_extension_for_class(x509.FreshestCRL).value
    assert fresh[0].full_name[0].value.endswith(f"/{shard}-delta.crl")
    delta = x509.load_der_x509_crl(docs["shard-delta"])
    ind = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    assert ind.critical
    assert ind.value.crl_number < delta.extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number
    assert delta.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value == \
        idp.value  # OpenSSL pairs a delta with its base only with the same IDP
    ca_level = x509.load_der_x509_crl(docs["ca-level"])
    with pytest.raises(x509.ExtensionNotFound):  # complete scope: usable for any leaf
        ca_level.extensions.get_extension_for_class(x509.IssuingDistributionPoint)
    # Contents: the revoked leaf on its shard and the CA-level CRL; the batch CA's CRL lists
    # its own revoked leaf; the good devices nowhere.
    assert w.plain_revoked.certificate.serial_number in _serials(docs["shard"])
    revoked_serial = w.plain_revoked.certificate.serial_number
    assert _serials(docs["ca-level"]) == {revoked_serial: "keyCompromise"}
    assert set(_serials(docs["batch-ca-level"])) == {w.own_revoked.certificate.serial_number}
    # Signatures, with OpenSSL.
    issuers = {"shard": w.plain_good.chain[0], "shard-delta": w.plain_good.chain[0],
               "ca-level": w.plain_good.chain[0], "ca-delta": w.plain_good.chain[0],
               "batch-ca-level": w.own_good.chain[0], "root": w.fleet.root_cert}
    for name, issuer in issuers.items():
        r = openssl("crl", "-in", write(tmp_path / f"{name}.crl", docs[name]), "-inform", "DER",
                    "-noout", "-CAfile", write(tmp_path / f"{name}-ca.pem", pem(issuer)))
        assert r.returncode == 0, (name, r.stderr)
        assert "verify OK" in r.stderr + r.stdout, (name, r.stderr)


def _root_id(ctx: ServiceContext) -> str:
    with ctx.sessions() as s:
        return s.scalars(select(CertificateAuthority.id).where(
            CertificateAuthority.kind == "root")).one()


def _verify(tmp: Path, leaf: Issued, crls: list[bytes], *flags: str) -> tuple[bool, str]:
    root = write(tmp / "root.pem", pem(leaf.root))
    untrusted = write(tmp / "chain.pem", b"".join(pem(c) for c in leaf.chain))
    leaf_file = write(tmp / "leaf.pem", pem(leaf.certificate))
    args: list[str | Path] = ["verify", "-CAfile", root, "-untrusted", untrusted, *flags]
    for i, der in enumerate(crls):
        args += ["-CRLfile", write(tmp / f"c{i}.crl", crl_pem(der))]
    r = openssl(*args, leaf_file)
    return r.returncode == 0, r.stdout + r.stderr


def test_openssl_verify_agrees_with_fleettrust(world: World, ctx: ServiceContext,
                                               tmp_path: Path) -> None:
    w = world
    factory_ca, batch_ca, fleet_ca = w.factory.ca.id, w.own.batch.ca_id, w.fleet.fleet_ca_id
    root_crl = _upload_root_crl(w)
    fleet_crl = _get(w, f"/crl/{fleet_ca}.crl")
    factory_crl = _get(w, f"/crl/{factory_ca}.crl")
    batch_crl = _get(w, f"/crl/{batch_ca}.crl")
    all_levels = [root_crl, fleet_crl, factory_crl, batch_crl]
    for leaf, revoked, issuer_crl in [(w.plain_revoked, True, factory_crl),
                                      (w.plain_good, False, factory_crl),
                                      (w.own_revoked, True, batch_crl),
                                      (w.own_good, False, batch_crl)]:
        # Leaf only, with the issuer's CA-level CRL (Mosquitto's and `-crl_check`'s view).
        ok, text = _verify(tmp_path, leaf, [issuer_crl], "-crl_check")
        assert ok is not revoked, text
        if revoked:
            assert "certificate revoked" in text
        # Every level checked: root CRL (offline ceremony), fleet CA, factory CA (, batch CA).
        ok, text = _verify(tmp_path, leaf, all_levels, "-crl_check_all")
        assert ok is not revoked, text
        # The leaf's own shard (its CRL DP) is accepted; another shard is out of scope.
        ca = factory_ca if issuer_crl is factory_crl else batch_ca
        shard = _shard(leaf.certificate, ctx)
        ok, text = _verify(tmp_path, leaf, [_get(w, f"/crl/{ca}/{shard}.crl")], "-crl_check")
        assert ok is not revoked, text
        other = (shard + 1) % ctx.settings.crl_shards
        ok, text = _verify(tmp_path, leaf, [_get(w, f"/crl/{ca}/{other}.crl")], "-crl_check")
        assert not ok
        assert "different CRL scope" in text, text

    # Revoking the batch CA in the root's... no: the factory revokes the batch -> the batch CA
    # certificate is listed by the factory CA, and -crl_check_all refuses its good leaf too.
    rev.revoke_batch(ctx, _admin(ctx), w.own.batch.id, "keyCompromise")
    factory_crl = _get(w, f"/crl/{factory_ca}.crl")
    batch_crl = _get(w, f"/crl/{batch_ca}.crl")
    ok, text = _verify(tmp_path, w.own_good, [root_crl, fleet_crl, factory_crl, batch_crl],
                       "-crl_check_all")
    assert not ok
    assert "certificate revoked" in text
    # The root revoking the fleet CA (offline) refuses everything below.
    with ctx.sessions() as s:
        fleet_row = s.get(CertificateAuthority, fleet_ca)
        assert fleet_row is not None
        assert fleet_row.serial_hex is not None
        fleet_serial = int(fleet_row.serial_hex, 16)
    root_crl = _upload_root_crl(w, [(fleet_serial, "cACompromise")])
    ok, text = _verify(tmp_path, w.plain_good, [root_crl, fleet_crl, factory_crl],
                       "-crl_check_all")
    assert not ok
    assert "certificate revoked" in text


def _admin(ctx: ServiceContext) -> Principal:
    from tests.conftest import make_principal

    return make_principal(ctx, "admin", "bob")


def test_delta_crls_hold_release_and_openssl_use_deltas(world: World, ctx: ServiceContext,
                                                        tmp_path: Path) -> None:
    w = world
    ca = w.factory.ca.id
    base = _get(w, f"/crl/{ca}.crl")  # the anchor: the first complete CRL
    base_no = x509.load_der_x509_crl(base).extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number
    admin = _admin(ctx)
    rev.suspend_device(ctx, admin, w.plain_good.device_id)
    full = _get(w, f"/crl/{ca}.crl")
    delta = _get(w, f"/crl/{ca}/delta.crl")
    good_serial = w.plain_good.certificate.serial_number
    assert _serials(full)[good_serial] == x509.ReasonFlags.certificate_hold.value
    d = x509.load_der_x509_crl(delta)
    assert d.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value.crl_number \
        == base_no
    assert _serials(delta) == {good_serial: "certificateHold"}
    assert_pkilint_clean_crl(delta)
    # OpenSSL: the old base alone says good; base + delta says revoked (on hold).
    ok, _ = _verify(tmp_path, w.plain_good, [base], "-crl_check")
    assert ok
    ok, text = _verify(tmp_path, w.plain_good, [base, delta], "-crl_check", "-use_deltas")
    assert not ok
    assert "revoked" in text, text
    # Release: off the complete CRL; the delta (still relative to the old base) no longer
    # lists it. Relative to a base that listed the hold, it says removeFromCRL.
    rev.release_device(ctx, admin, w.plain_good.device_id)
    full = _get(w, f"/crl/{ca}.crl")
    assert good_serial not in _serials(full)
    assert good_serial not in _serials(_get(w, f"/crl/{ca}/delta.crl"))
    rev.suspend_device(ctx, admin, w.plain_good.device_id)
    with ctx.sessions() as s:  # make the next publication re-anchor on the CRL with the hold
        for doc in s.scalars(select(CrlDocument).where(CrlDocument.ca_id == ca)):
            doc.this_update -= dt.timedelta(days=2)
        s.commit()
    # CRLs follow revocations through the server's in-memory index (100 ms poll): wait for it.
    deadline = time.monotonic() + 5
    anchored = _get(w, f"/crl/{ca}.crl")
    while good_serial not in _serials(anchored) and time.monotonic() < deadline:
        time.sleep(0.1)
        anchored = _get(w, f"/crl/{ca}.crl")
    assert _serials(anchored)[good_serial] == "certificateHold"
    rev.release_device(ctx, admin, w.plain_good.device_id)

    def released(d: bytes) -> bool:
        """The delta reflects the release: removeFromCRL relative to the anchored base, or a
        newer base (without the hold) that the delta is relative to."""
        n = x509.load_der_x509_crl(d).extensions.get_extension_for_class(
            x509.DeltaCRLIndicator).value.crl_number
        anchored_no = x509.load_der_x509_crl(anchored).extensions.get_extension_for_class(
            x509.CRLNumber).value.crl_number
        return n > anchored_no or _serials(d) == {good_serial: "removeFromCRL"}

    deadline = time.monotonic() + 5  # CRLs follow revocations within the promised 5 s
    delta = _get(w, f"/crl/{ca}/delta.crl")
    while not released(delta) and time.monotonic() < deadline:
        time.sleep(0.1)
        delta = _get(w, f"/crl/{ca}/delta.crl")
    assert_pkilint_clean_crl(delta)
    # The server's publisher may already have re-anchored on a new base CRL (without the hold)
    # when the delta is fetched; both outcomes are correct RFC 5280 publications.
    base_number = x509.load_der_x509_crl(delta).extensions.get_extension_for_class(
        x509.DeltaCRLIndicator).value.crl_number
    anchored_number = x509.load_der_x509_crl(anchored).extensions.get_extension_for_class(
        x509.CRLNumber).value.crl_number
    if base_number == anchored_number:
        assert _serials(delta) == {good_serial: "removeFromCRL"}
        base = anchored
    else:
        assert base_number > anchored_number
        base = _get(w, f"/crl/{ca}.crl")
        assert good_serial not in _serials(base)
        assert good_serial not in _serials(delta)
    ok, text = _verify(tmp_path, w.plain_good, [base, delta], "-crl_check", "-use_deltas")
    assert ok, text


def test_http_caching_errors_and_numbers(world: World, ctx: ServiceContext) -> None:
    w = world
    ca = w.factory.ca.id
    r = w.client.get(f"/crl/{ca}/0.crl")
    assert r.status_code == 200
    etag = r.headers["etag"]
    max_age = int(r.headers["cache-control"].split("max-age=")[1])
    crl = x509.load_der_x509_crl(r.content)
    assert 0 < max_age <= 60
    assert crl.next_update_utc is not None
    assert crl.next_update_utc - crl.last_update_utc == dt.timedelta(hours=24)
    assert w.client.get(f"/crl/{ca}/0.crl", headers={"If-None-Match": etag}).status_code == 304
    for path, code in [(f"/crl/{ca}/99.crl", "crl_not_found"), (f"/crl/{ca}/x.crl",
                                                                "crl_not_found"),
                       ("/crl/ca_nope.crl", "crl_not_found")]:
        r = w.client.get(path)
        assert (r.status_code, r.json()["code"]) == (404, code), path
    numbers = []
    for _ in range(3):  # every revocation -> new, higher numbers
        numbers.append(x509.load_der_x509_crl(_get(w, f"/crl/{ca}.crl")).extensions
                       .get_extension_for_class(x509.CRLNumber).value.crl_number)
        rev.revoke_device(ctx, _admin(ctx), issue(ctx, _admin(ctx),
                                                  _first_batch(ctx, w), 1)[0].device_id)
    assert numbers == sorted(set(numbers))
    # The root CRL upload refuses garbage, a foreign signature and a number that does not grow.
    auth = {"Authorization": f"Bearer {w.token}"}
    r = w.client.post("/v1/crl/root", json={"crl": "AAAA"}, headers=auth)
    assert (r.status_code, r.json()["code"]) == (422, "crl_malformed")
    factory_crl = _get(w, f"/crl/{ca}.crl")
    r = w.client.post("/v1/crl/root", json={"crl": base64.b64encode(factory_crl).decode()},
                      headers=auth)
    assert (r.status_code, r.json()["code"]) == (422, "crl_wrong_issuer")
    der = _upload_root_crl(w)
    r = w.client.post("/v1/crl/root", json={"crl": base64.b64encode(der).decode()},
                      headers=auth)
    assert (r.status_code, r.json()["code"]) == (409, "crl_number_not_increasing")
    auditor = make_token(ctx, "auditor", "audrey")
    r = w.client.post("/v1/crl/root", json={"crl": base64.b64encode(der).decode()},
                      headers={"Authorization": f"Bearer {auditor}"})
    assert r.status_code == 403


def _first_batch(ctx: ServiceContext, w: World) -> str:
    from fleettrust.storage.models import Batch

    with ctx.sessions() as s:
        return s.scalars(select(Batch.id).where(Batch.factory_id == w.factory.factory.id,
                                                Batch.own_ca.is_(False))).first() or ""


def test_numbers_grow_across_processes_publishing_at_once(world: World,
                                                          ctx: ServiceContext) -> None:
    """Two service contexts (as two server processes would) regenerate concurrently."""
    ca = world.factory.ca.id
    other = ServiceContext.create(ctx.settings)
    pubs = [CrlPublisher(ctx, recheck_s=0.0), CrlPublisher(other, recheck_s=0.0)]
    seen: list[int] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def work(pub: CrlPublisher) -> None:
        try:
            for _ in range(4):
                pub.publish_ca(ca, force=True)
                n = pub.document(ca, -1, "full").crl_number
                with lock:
                    seen.append(n)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(p,)) for p in pubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    other.close()
    assert not errors, errors
    with ctx.sessions() as s:
        state = s.scalars(select(CrlState).where(CrlState.ca_id == ca, CrlState.shard == -1)
                          ).one()
        full = s.scalars(select(CrlDocument).where(
            CrlDocument.ca_id == ca, CrlDocument.shard == -1, CrlDocument.kind == "full")).one()
    # 8 forced publications (+ the first), two numbers each, never reused.
    assert state.crl_number >= 2 * 8
    assert full.crl_number == state.crl_number - 1
    assert len(set(seen)) >= 1
    assert max(seen) <= full.crl_number


def test_external_factory_ca_has_no_platform_crl(ctx: ServiceContext, admin: Principal,
                                                 fleet: Hierarchy) -> None:
    ext = hierarchy.create_factory(ctx, admin, name="Own token", key_location="external")
    app = create_app(ctx)
    app.include_router(public_router)
    with AppServer(app) as client:
        r = client.get(f"/crl/{ext.ca.id}.crl")
    assert (r.status_code, r.json()["code"]) == (404, "crl_unavailable")
