"""Mosquitto integration with a real broker and real mosquitto_sub / mosquitto_pub clients.

A good device connects and receives the feed; after ``revoke_device`` the connected
``mosquitto_sub`` of the revoked device is disconnected within seconds and a new
``mosquitto_pub`` with its certificate is refused in the TLS handshake; another device stays
connected and keeps receiving.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from fleettrust.revocation import mosquitto as mq
from fleettrust.revocation.crl_publisher import CrlPublisher
from fleettrust.revocation.mqtt import RevocationPublisher, topic
from fleettrust.services import revocation as rev
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import BatchCreated
from fleettrust.storage.models import Certificate, CertificateAuthority, Revocation
from tests.api.gateway_fixtures import DeviceFiles, enroll
from tests.conftest import free_port
from tests.revocation.feed_support import Mosquitto, wait_until


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """SQLite only: the broker, not the database, is under test here."""
    return f"sqlite:///{tmp_path / 'fleettrust.db'}"


def crl_source(ctx: ServiceContext) -> tuple[list[bytes], set[str]]:
    """The core's CRLs, regenerated now where stale (the server's publisher does this on every
    revocation; the test has no running publisher)."""
    CrlPublisher(ctx).publish_stale()
    return mq.stored_crls(ctx)


_standin_cache: dict[int, tuple[list[bytes], set[str]]] = {}


def _standin_crls(ctx: ServiceContext) -> tuple[list[bytes], set[str]]:
    now = dt.datetime.now(dt.UTC)
    out: list[bytes] = []
    cas: set[str] = set()
    with ctx.sessions() as s:
        seq = int(s.scalar(select(Revocation.seq).order_by(Revocation.seq.desc())) or 0)
        for ca in s.scalars(select(CertificateAuthority).where(
                CertificateAuthority.kind != "root", CertificateAuthority.key_id.is_not(None))):
            assert ca.certificate_der is not None
            issuer = x509.load_der_x509_certificate(ca.certificate_der)
            revoked = [x509.RevokedCertificateBuilder().serial_number(int(c.serial_hex, 16))
                       .revocation_date(c.revoked_at or now).build()
                       for c in s.scalars(select(Certificate).where(
                           Certificate.ca_id == ca.id, Certificate.status != "good"))]
            b = x509.CertificateRevocationListBuilder(
                issuer_name=issuer.subject, last_update=now - dt.timedelta(minutes=1),
                next_update=now + dt.timedelta(hours=1), revoked_certificates=revoked,
                extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(seq + 1)),
                            x509.Extension(x509.AuthorityKeyIdentifier.oid, False,
                                           x509.AuthorityKeyIdentifier.from_issuer_public_key(
                                               issuer.public_key()))])  # type: ignore[arg-type]
            assert ca.key_id is not None
            crl = ctx.signer(ca.key_id).sign_crl(b)
            assert crl.signature_hash_algorithm is None or isinstance(
                crl.signature_hash_algorithm, hashes.HashAlgorithm)
            out.append(crl.public_bytes(serialization.Encoding.DER))
            cas.add(ca.id)
    return out, cas


def _tls_args(setup: mq.MosquittoSetup, dev: DeviceFiles) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(setup.options.tls_port),
            "--cafile", str(dev.root_path), "--cert", str(dev.cert_path),
            "--key", str(dev.key_path)]


class Sub:
    """A real ``mosquitto_sub`` process of one device."""

    def __init__(self, setup: mq.MosquittoSetup, dev: DeviceFiles, out: Path) -> None:
        self.out = out
        fh = out.open("wb")
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", *_tls_args(setup, dev),
             "-t", "fleettrust/revocations/#", "-v", "-d", "-i", f"sub-{dev.device_id}"],
            stdout=fh, stderr=subprocess.STDOUT)
        fh.close()

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def subscribed(self) -> bool:
        return "Subscribed (mid: 1): 1" in self.text() or "Subscribed (mid: 1): 0" in self.text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


def test_revoked_device_is_kicked_and_cannot_reconnect(
        ctx: ServiceContext, admin: Principal, batch: BatchCreated,
        factory_principal: Principal, tmp_path: Path) -> None:
    good = enroll(ctx, factory_principal, batch.batch.id, tmp_path / "good", "good")
    bad = enroll(ctx, factory_principal, batch.batch.id, tmp_path / "bad", "bad")
    options = mq.MosquittoOptions(tls_port=free_port(), admin_port=free_port(), user="root",
                                  persistence=False)
    setup = mq.configure(ctx, tmp_path / "broker", options, crl_source=crl_source)
    conf = setup.files.conf.read_text()
    assert "require_certificate true" in conf
    assert "use_identity_as_username true" in conf
    assert f"crlfile {setup.files.crlfile}" in conf
    assert setup.files.keyfile.stat().st_mode & 0o777 == 0o600
    with Mosquitto(setup.files.conf, options.tls_port) as broker:
        assert wait_until(setup.files.pidfile.exists, 5)
        assert int(setup.files.pidfile.read_text()) == broker.pid
        sync = mq.MosquittoSync(ctx, setup.files.dir, crl_source=crl_source, poll_s=0.05)
        publisher = RevocationPublisher(ctx, setup.admin_broker())
        subs = {"good": Sub(setup, good, tmp_path / "good.out"),
                "bad": Sub(setup, bad, tmp_path / "bad.out")}
        try:
            assert wait_until(lambda: all(s.subscribed() for s in subs.values()), 10), \
                {k: s.text() for k, s in subs.items()}
            sync.start()
            publisher.start()
            assert wait_until(publisher.is_leader.is_set, 5)
            # a new leader starts at the database head: wait until it has read it
            assert wait_until(lambda: publisher.published_seq >= 0, 5)
            t0 = time.monotonic()
            rev.revoke_device(ctx, admin, bad.device_id, "keyCompromise")
            # the connected mosquitto_sub of the revoked device is disconnected...
            assert wait_until(lambda: subs["bad"].proc.poll() is not None
                              or "Connection error" in subs["bad"].text()
                              or "connection was lost" in subs["bad"].text(), 8), \
                subs["bad"].text()
            kicked_after = time.monotonic() - t0
            assert kicked_after < 5
            # ...and cannot come back: the TLS handshake fails on the CRL
            r = subprocess.run(["mosquitto_pub", *_tls_args(setup, bad), "-t", "x", "-m", "y",
                                "-d"], capture_output=True, text=True, timeout=10)
            assert r.returncode != 0, r.stdout + r.stderr
            v = subprocess.run(["openssl", "verify", "-crl_check", "-CAfile",
                                str(setup.files.cafile), "-CRLfile", str(setup.files.crlfile),
                                str(bad.cert_path)], capture_output=True, text=True, check=False)
            assert "certificate revoked" in v.stdout + v.stderr  # the reason the broker uses
            # the other device is unaffected: still connected, it received the revocation
            assert subs["good"].proc.poll() is None
            assert wait_until(lambda: bad.serial in subs["good"].text(), 5), subs["good"].text()
            line = next(ln for ln in subs["good"].text().splitlines()
                        if ln.startswith(topic("v1") + " "))
            page = json.loads(line.split(" ", 1)[1])
            assert [e["serial"] for e in page["events"]] == [bad.serial]
            r = subprocess.run(["mosquitto_pub", *_tls_args(setup, good), "-t",
                                "fleettrust/revocations/v1", "-m", "forged", "-q", "1"],
                               capture_output=True, text=True, timeout=10)
            assert r.returncode == 0, r.stderr  # the good device still connects
            time.sleep(0.3)
            assert "forged" not in subs["good"].text()  # devices may not publish the feed
            # an unknown username on the admin listener is refused
            c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="intruder")
            c.username_pw_set("d-someone", "guess")
            refused: list[object] = []
            c.on_connect = lambda _c, _u, _f, rc, _p: refused.append(rc)
            c.connect("127.0.0.1", options.admin_port)
            c.loop_start()
            assert wait_until(lambda: bool(refused), 5)
            c.loop_stop()
            assert refused[0].is_failure  # type: ignore[attr-defined]
        finally:
            for s in subs.values():
                s.stop()
            publisher.stop()
            sync.stop()
    assert sync.reports
    assert sync.reports[0].kicked == [bad.device_id]
    assert sync.reports[0].reloaded
