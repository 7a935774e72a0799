"""The device gateway over real mutual TLS: check-in, refusals with precise reasons, renewal,
connection closing on status change, shared-secret devices, curl as an independent client."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fleettrust.services import gateway as gw_svc
from fleettrust.services import hierarchy, shared_secret
from fleettrust.services.auth import Principal
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import Device
from tests.api.gateway_fixtures import (
    DeviceFiles,
    RunningGateway,
    enroll,
    foreign_client_cert,
    tls_client,
)
from tests.conftest import device_csr, manifest


@pytest.fixture
def gateway(ctx: ServiceContext, fleet: object) -> Iterator[RunningGateway]:
    with RunningGateway(ctx) as g:
        yield g


@pytest.fixture
def device(
    ctx: ServiceContext, factory_principal: Principal, batch: hierarchy.BatchCreated, tmp_path: Path
) -> DeviceFiles:
    return enroll(ctx, factory_principal, batch.batch.id, tmp_path / "dev1")


def test_enrolled_device_checks_in(
    ctx: ServiceContext, gateway: RunningGateway, device: DeviceFiles
) -> None:
    with device.client(gateway) as c:
        r = c.post("/v1/device/checkin", json=device.checkin_body(boot_counter=7))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["device_id"] == device.device_id
        assert body["status"] == "active"
        assert body["renew"] is False
        r2 = c.post("/v1/device/checkin", json=device.checkin_body(boot_counter=7))
        assert r2.status_code == 200
    with ctx.sessions() as s:
        d = s.get(Device, device.device_id)
        assert d is not None
        assert d.last_seen_at is not None
        assert d.last_remote_addr == "127.0.0.1"
        assert d.boot_counter == 7
        assert d.checkin_count == 2
        assert d.firmware_version == "1.0.0"
        assert d.last_session


def test_curl_is_an_independent_client(
    gateway: RunningGateway, device: DeviceFiles, tmp_path: Path
) -> None:
    body = tmp_path / "body.json"
    import json

    body.write_text(json.dumps(device.checkin_body()))
    out = subprocess.run(
        [
            "curl",
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            str(device.root_path),
            "--cert",
            str(device.cert_path),
            "--key",
            str(device.key_path),
            "-H",
            "content-type: application/json",
            "--data-binary",
            f"@{body}",
            "-w",
            "\n%{http_code}",
            f"https://127.0.0.1:{gateway.port}/v1/device/checkin",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    text, code = out.stdout.rsplit("\n", 1)
    assert code == "200", text
    assert device.device_id in text


def test_no_client_certificate_is_refused(
    gateway: RunningGateway, device: DeviceFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fleettrust.gateway")
    with httpx.Client(base_url=gateway.url, verify=tls_client(device.root_path), timeout=10) as c:
        r = c.post("/v1/device/checkin", json=device.checkin_body())
    assert r.status_code == 401
    assert r.json()["code"] == "client_certificate_required"
    assert "client_certificate_required" in caplog.text


def test_foreign_ca_is_refused_in_handshake(
    gateway: RunningGateway, device: DeviceFiles, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fleettrust.gateway")
    cp, kp = foreign_client_cert(tmp_path)
    with (
        httpx.Client(
            base_url=gateway.url, verify=tls_client(device.root_path, cp, kp), timeout=10
        ) as c,
        pytest.raises(httpx.HTTPError),
    ):
        c.post("/v1/device/checkin", json=device.checkin_body())
    time.sleep(0.2)
    assert "refused TLS client in handshake" in caplog.text
    assert "unknown_ca" in caplog.text


def test_expired_certificate_is_refused(
    ctx: ServiceContext,
    gateway: RunningGateway,
    factory: hierarchy.FactoryCreated,
    device: DeviceFiles,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A certificate signed by the real factory CA whose validity ended a moment ago."""
    caplog.set_level(logging.WARNING, logger="fleettrust.gateway")
    issuer = hierarchy.load_ca_cert(factory.ca)
    assert factory.ca.key_id is not None
    signer = ctx.signer(factory.ca.key_id)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "d-old")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(issuer.not_valid_before_utc)
        .not_valid_after(now - dt.timedelta(seconds=5))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()), critical=False
        )  # type: ignore[arg-type]
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    cert = signer.sign_certificate(builder)
    cp, kp = tmp_path / "expired.pem", tmp_path / "expired.key"
    chain = device.cert_path.read_text().split("-----END CERTIFICATE-----\n", 1)[1]
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + chain.encode())
    kp.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with (
        httpx.Client(
            base_url=gateway.url, verify=tls_client(device.root_path, cp, kp), timeout=10
        ) as c,
        pytest.raises(httpx.HTTPError),
    ):
        c.post("/v1/device/checkin", json=device.checkin_body())
    time.sleep(0.2)
    assert "certificate_expired" in caplog.text


def test_manifest_signed_by_wrong_key_is_refused(
    gateway: RunningGateway, device: DeviceFiles, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="fleettrust.gateway")
    other = ec.generate_private_key(ec.SECP256R1())
    with device.client(gateway) as c:
        r = c.post("/v1/device/checkin", json=device.checkin_body(sign_with=other))
    assert r.status_code == 403
    assert r.json()["code"] == "manifest_signature_invalid"
    assert "manifest_signature_invalid" in caplog.text


@pytest.mark.parametrize("status", ["suspended", "decommissioned"])
def test_forbidden_registry_states(
    ctx: ServiceContext, admin: Principal, gateway: RunningGateway, device: DeviceFiles, status: str
) -> None:
    gw_svc.set_device_status(ctx, admin, device.device_id, status, "test")
    with device.client(gateway) as c:
        r = c.post("/v1/device/checkin", json=device.checkin_body())
    assert r.status_code == 403
    assert r.json()["code"] == f"device_{status}"


def test_quarantined_device_may_only_check_in(
    ctx: ServiceContext, admin: Principal, gateway: RunningGateway, device: DeviceFiles
) -> None:
    gw_svc.set_device_status(ctx, admin, device.device_id, "quarantined", "clone suspect")
    with device.client(gateway) as c:
        r = c.post("/v1/device/checkin", json=device.checkin_body())
        assert r.status_code == 200
        assert r.json()["status"] == "quarantined"
        csr, _ = device_csr()
        r = c.post("/v1/device/renew", json={"csr": csr, "old_key_proof": "AA=="})
        assert r.status_code == 403
        assert r.json()["code"] == "device_quarantined"


def test_unknown_certificate_from_fleet_ca_is_refused(
    ctx: ServiceContext, gateway: RunningGateway, device: DeviceFiles
) -> None:
    """A certificate that chains to the fleet but is not a device certificate in the registry
    (here: the gateway's own server certificate would not do, so remove the device's row)."""
    from sqlalchemy import update

    from fleettrust.storage.models import Certificate

    with ctx.transaction() as s:
        s.execute(
            update(Certificate).where(Certificate.serial_hex == device.serial).values(kind="server")
        )
    with device.client(gateway) as c:
        r = c.post("/v1/device/checkin", json=device.checkin_body())
    assert r.status_code == 403
    assert r.json()["code"] == "certificate_unknown"


def test_status_change_closes_open_connections(
    ctx: ServiceContext, admin: Principal, gateway: RunningGateway, device: DeviceFiles
) -> None:
    """A long-lived event stream and a kept-alive connection are both dropped."""
    events: list[str] = []
    ended = threading.Event()

    def follow() -> None:
        try:
            with device.client(gateway) as c, c.stream("GET", "/v1/device/events") as r:
                for line in r.iter_lines():
                    events.append(line)
        except httpx.HTTPError:
            pass
        finally:
            ended.set()

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    deadline = time.time() + 5
    while not any("hello" in e for e in events) and time.time() < deadline:
        time.sleep(0.02)
    assert any("hello" in e for e in events)
    started = time.monotonic()
    gw_svc.set_device_status(ctx, admin, device.device_id, "suspended", "stolen")
    assert ended.wait(5), "event stream was not closed"
    assert time.monotonic() - started < 2.5
    with device.client(gateway) as c:
        r = c.post("/v1/device/checkin", json=device.checkin_body())
        assert r.status_code == 403
        assert r.json()["code"] == "device_suspended"


def test_renewal_keeps_identity(
    ctx: ServiceContext, gateway: RunningGateway, device: DeviceFiles, tmp_path: Path
) -> None:
    new_key = ec.generate_private_key(ec.SECP256R1())
    csr_pem, _ = device_csr(new_key)
    csr_der = x509.load_pem_x509_csr(csr_pem.encode()).public_bytes(serialization.Encoding.DER)
    proof = device.key.sign(
        gw_svc.RENEW_CONTEXT + hashlib.sha256(csr_der).digest(), ec.ECDSA(hashes.SHA256())
    )
    with device.client(gateway) as c:
        bad = c.post(
            "/v1/device/renew",
            json={"csr": csr_pem, "old_key_proof": base64.b64encode(b"x" * 70).decode()},
        )
        assert bad.status_code == 403
        assert bad.json()["code"] == "old_key_proof_invalid"
        r = c.post(
            "/v1/device/renew",
            json={"csr": csr_pem, "old_key_proof": base64.b64encode(proof).decode()},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        again = c.post(
            "/v1/device/renew",
            json={"csr": csr_pem, "old_key_proof": base64.b64encode(proof).decode()},
        )
        assert again.status_code == 409
        assert again.json()["code"] == "key_reused"
    assert body["device_id"] == device.device_id
    assert body["serial"] != device.serial
    new = dataclasses.replace(
        device, key=new_key, cert_path=tmp_path / "renewed.pem", key_path=tmp_path / "renewed.key"
    )
    new.cert_path.write_text(body["certificate_pem"] + "".join(body["chain_pem"]))
    new.key_path.write_bytes(
        new_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with new.client(gateway) as c:
        r = c.post("/v1/device/checkin", json=new.checkin_body())
        assert r.status_code == 200
        assert r.json()["device_id"] == device.device_id


def test_shared_secret_device_checks_in(
    ctx: ServiceContext,
    factory: hierarchy.FactoryCreated,
    factory_principal: Principal,
    gateway: RunningGateway,
    device: DeviceFiles,
) -> None:
    created = hierarchy.create_batch(
        ctx,
        factory_principal,
        factory.factory.id,
        name="tiny",
        product_model="S-1",
        hardware_revision="a",
        planned_size=5,
        manufactured_on=dt.date(2026, 11, 1),
        auth_method="shared_secret",
    )
    assert created.group_secret
    [dev_id] = shared_secret.register_devices(
        ctx, factory_principal, created.batch.id, [{"device_id": "tiny-1", "manifest": manifest()}]
    )
    key = shared_secret.derive_device_key(created.group_secret, dev_id)
    with httpx.Client(base_url=gateway.url, verify=tls_client(device.root_path), timeout=10) as c:
        nonce = c.post("/v1/device/challenge", json={"device_id": dev_id}).json()["nonce"]
        mac = shared_secret.response_mac(key, dev_id, nonce)
        r = c.post("/v1/device/auth", json={"device_id": dev_id, "nonce": nonce, "mac": mac})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        replay = c.post("/v1/device/auth", json={"device_id": dev_id, "nonce": nonce, "mac": mac})
        assert replay.status_code == 401
        assert replay.json()["code"] == "nonce_replayed"
        body = {"firmware_version": "0.1", "boot_counter": 1, "uptime_s": 5, "manifest": manifest()}
        r = c.post("/v1/device/checkin", json=body, headers={"authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
        assert r.json()["device_id"] == dev_id
        r = c.post("/v1/device/checkin", json=body, headers={"authorization": "Bearer nope"})
        assert r.status_code == 401
