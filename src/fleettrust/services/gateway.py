"""The device channel's service layer: who is this device, check-ins, renewal, status changes.

The gateway app hands this module the peer certificate (DER) the TLS layer verified against the
fleet root, or a shared-secret session token. Lookups answer "which device, may it talk now?" with
a distinct refusal code for every reason (see docs/device-protocol.md). Status changes are logged
in ``status_changes`` so every server process can close the connections of an affected device.

Not here: TLS (``api.tls``), HTTP (``api.gateway``), drift scoring and clone detection (identity).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import functools
import hashlib
from dataclasses import dataclass
from typing import Any, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from sqlalchemy import String, Table, Update, bindparam, func, select, update

from fleettrust import pki
from fleettrust.errors import (
    AuthenticationError,
    AuthorizationError,
    ConflictError,
    NotFoundError,
    ValidationError,
)
from fleettrust.ids import new_id
from fleettrust.services import audit
from fleettrust.services.auth import Principal, require
from fleettrust.services.context import ServiceContext
from fleettrust.services.hierarchy import ca_chain, crl_url, fleet_ca, pem, urls
from fleettrust.services.issuance import _der_to_pem, _profile
from fleettrust.storage.models import (
    Certificate,
    CertificateAuthority,
    Device,
    ServerCredential,
    StatusChange,
)

MANIFEST_CONTEXT = b"fleettrust-manifest-v1\n"
RENEW_CONTEXT = b"fleettrust-renew-v1\n"
DEVICE_STATUSES = ("active", "suspended", "quarantined", "decommissioned", "revoked")
RENEW_BEFORE = dt.timedelta(days=30)
NEXT_CHECKIN_S = 300


@dataclass(frozen=True)
class DeviceIdentity:
    device_id: str
    status: str
    auth_method: str  # certificate | shared_secret
    serial_hex: str | None
    certificate_der: bytes | None
    # What the revocation index needs to apply batch / factory / CA / window rules in O(1).
    ca_id: str | None = None
    batch_id: str | None = None
    factory_id: str | None = None
    issued_at: dt.datetime | None = None

    @functools.cached_property
    def certificate(self) -> x509.Certificate:
        """The parsed certificate, parsed once per identity (identities are cached per TLS
        connection, so a kept-alive device does not re-parse it on every check-in)."""
        assert self.certificate_der is not None
        return x509.load_der_x509_certificate(self.certificate_der)

    def public_key(self) -> Any:
        return self.certificate.public_key()


def _refuse_status(status: str, *, allow_quarantine: bool) -> None:
    if status == "active" or (status == "quarantined" and allow_quarantine):
        return
    raise AuthorizationError(f"device is {status}", code=f"device_{status}")


def identify_certificate(ctx: ServiceContext, cert_der: bytes) -> DeviceIdentity:
    """Map a TLS-verified client certificate to a device, or refuse with a precise code."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        raise AuthenticationError(
            "client certificate is not parseable", code="certificate_malformed"
        ) from exc
    serial_hex = format(cert.serial_number, "x")
    with ctx.sessions() as s:
        row = s.execute(
            select(
                Certificate.der,
                Certificate.status,
                Certificate.kind,
                Device.id,
                Device.status,
                Device.auth_method,
                Certificate.ca_id,
                Device.batch_id,
                Device.factory_id,
                Certificate.created_at,
            )
            .join(Device, Device.id == Certificate.device_id, isouter=True)
            .where(Certificate.serial_hex == serial_hex)
        ).first()
    if row is None or row[0] != cert_der or row[2] != "device":
        raise AuthorizationError(
            "certificate was not issued to a device by this fleet", code="certificate_unknown"
        )
    (_, cert_status, _, device_id, device_status, auth_method, ca_id, batch_id, factory_id,
     issued_at) = row
    if cert_status == "revoked":
        raise AuthorizationError("certificate is revoked", code="certificate_revoked")
    if cert_status == "hold":
        raise AuthorizationError("certificate is on hold", code="certificate_on_hold")
    if device_id is None:
        raise AuthorizationError("no device for this certificate", code="device_unknown")
    return DeviceIdentity(device_id, device_status, auth_method, serial_hex, cert_der,
                          ca_id=ca_id, batch_id=batch_id, factory_id=factory_id,
                          issued_at=issued_at)


def identify_session(ctx: ServiceContext, token: str) -> DeviceIdentity:
    from fleettrust.services.shared_secret import authenticate_session

    device_id = authenticate_session(ctx, token)
    with ctx.sessions() as s:
        d = s.get(Device, device_id)
        if d is None:
            raise AuthorizationError("device no longer exists", code="device_unknown")
        return DeviceIdentity(device_id, d.status, d.auth_method, None, None,
                              batch_id=d.batch_id, factory_id=d.factory_id)


def check_allowed(ident: DeviceIdentity, *, allow_quarantine: bool = False) -> None:
    _refuse_status(ident.status, allow_quarantine=allow_quarantine)


# Built once (bound parameters): refresh_status runs on most check-ins of real devices, whose
# connections are older than the per-connection cache's freshness bound.
_REFRESH_STATUS = (
    select(Device.status, Certificate.status)
    .select_from(Device)
    .join(Certificate, Certificate.serial_hex == bindparam("p_serial", type_=String()),
          isouter=True)
    .where(Device.id == bindparam("p_id", type_=String()))
)


def refresh_status(ctx: ServiceContext, ident: DeviceIdentity) -> DeviceIdentity:
    """Re-read the current device and certificate status (cheap; used by the per-connection
    cache when its entry is older than the cache's freshness bound)."""
    with ctx.sessions() as s:
        row = s.execute(_REFRESH_STATUS,
                        {"p_serial": ident.serial_hex, "p_id": ident.device_id}).first()
    if row is None:
        raise AuthorizationError("device no longer exists", code="device_unknown")
    dev_status, cert_status = row
    if ident.serial_hex is not None:
        if cert_status == "revoked":
            raise AuthorizationError("certificate is revoked", code="certificate_revoked")
        if cert_status == "hold":
            raise AuthorizationError("certificate is on hold", code="certificate_on_hold")
    return dataclasses.replace(ident, status=dev_status)


def verify_device_signature(public_key: Any, signature: bytes, message: bytes) -> None:
    """Verify a device-key signature (ECDSA with the curve's hash, Ed25519, RSA PKCS#1 v1.5)."""
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            h: hashes.HashAlgorithm = (
                hashes.SHA384() if public_key.curve.key_size >= 384 else hashes.SHA256()
            )
            public_key.verify(signature, message, ec.ECDSA(h))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, message)
        elif isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise InvalidSignature
    except InvalidSignature as exc:
        raise AuthorizationError(
            "signature does not verify with the device key", code="signature_invalid"
        ) from exc


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise ValidationError(f"{what} is not valid base64", code="bad_base64") from exc


def _checkin_update() -> Update:
    """The check-in's one UPDATE, built once: a Core statement with bound parameters (no ORM
    session synchronisation, no per-call statement construction; about 0.4 ms less per
    check-in than ``update(Device).values(...)`` on these machines)."""
    t = cast(Table, Device.__table__)
    c = t.c
    return (update(t).where(c.id == bindparam("p_id", type_=c.id.type)).values(
        last_seen_at=bindparam("p_seen", type_=c.last_seen_at.type),
        last_remote_addr=bindparam("p_addr", type_=c.last_remote_addr.type),
        last_session=bindparam("p_session", type_=c.last_session.type),
        firmware_version=bindparam("p_firmware", type_=c.firmware_version.type),
        boot_counter=bindparam("p_boot", type_=c.boot_counter.type),
        agent_generation=bindparam("p_generation", type_=c.agent_generation.type),
        uptime_s=bindparam("p_uptime", type_=c.uptime_s.type),
        health=bindparam("p_health", type_=c.health.type),
        checkin_count=c.checkin_count + 1,
    ))


_CHECKIN_UPDATE = _checkin_update()


@dataclass(frozen=True)
class CheckinReport:
    firmware_version: str
    boot_counter: int
    uptime_s: int
    agent_generation: int | None
    manifest: dict[str, Any]
    manifest_signature: str | None
    health: dict[str, Any]


def checkin(
    ctx: ServiceContext,
    ident: DeviceIdentity,
    report: CheckinReport,
    *,
    remote_addr: str | None,
    session_id: str | None,
) -> dict[str, Any]:
    """Record a check-in and tell the device what to do next."""
    check_allowed(ident, allow_quarantine=True)
    now = ctx.clock.now()
    # Step 1: the manifest claim must come from the key holder (certificate devices).
    manifest = pki.normalize_manifest(report.manifest)
    canon = pki.canonical_json(manifest)
    if ident.auth_method == "certificate":
        if not report.manifest_signature:
            raise AuthorizationError(
                "manifest_signature is required for certificate devices",
                code="manifest_signature_missing",
            )
        try:
            verify_device_signature(
                ident.public_key(),
                _b64(report.manifest_signature, "manifest_signature"),
                MANIFEST_CONTEXT + canon,
            )
        except AuthorizationError as exc:
            raise AuthorizationError(
                "manifest signature does not verify with the certificate's key",
                code="manifest_signature_invalid",
            ) from exc
    # Step 2: record the device's state.
    # Renewal is due by the presented certificate's own notAfter (the same value as the
    # registry's Certificate.not_after): no second query per check-in.
    renew = (ident.certificate_der is not None
             and ident.certificate.not_valid_after_utc - now < RENEW_BEFORE)
    with ctx.transaction() as s:
        s.execute(_CHECKIN_UPDATE, {
            "p_id": ident.device_id, "p_seen": now, "p_addr": remote_addr,
            "p_session": session_id, "p_firmware": report.firmware_version,
            "p_boot": report.boot_counter, "p_generation": report.agent_generation,
            "p_uptime": report.uptime_s, "p_health": report.health,
        })
    return {
        "device_id": ident.device_id,
        "status": ident.status,
        "server_time": now.isoformat().replace("+00:00", "Z"),
        "next_checkin_s": NEXT_CHECKIN_S,
        "renew": renew,
        "manifest_sha256": hashlib.sha256(canon).hexdigest(),
        "actions": [],
    }


def renew(
    ctx: ServiceContext,
    ident: DeviceIdentity,
    csr_pem: str,
    old_key_proof: str,
    *,
    remote_addr: str | None,
) -> dict[str, Any]:
    """Issue a new certificate for the same device to a new key (mTLS devices only)."""
    check_allowed(ident)
    if ident.serial_hex is None:
        raise AuthorizationError(
            "renewal needs a certificate-authenticated device", code="certificate_required"
        )
    csr = pki.load_csr(csr_pem)
    new_key = csr.public_key()
    pki.check_key_allowed(new_key)
    csr_der = csr.public_bytes(serialization.Encoding.DER)
    try:
        verify_device_signature(
            ident.public_key(),
            _b64(old_key_proof, "old_key_proof"),
            RENEW_CONTEXT + hashlib.sha256(csr_der).digest(),
        )
    except AuthorizationError as exc:
        raise AuthorizationError(
            "old_key_proof does not verify with the current key", code="old_key_proof_invalid"
        ) from exc
    key_fp = pki.public_key_fingerprint(new_key)
    now = ctx.clock.now()
    with ctx.transaction() as s:
        if s.scalar(
            select(func.count())
            .select_from(Certificate)
            .where(Certificate.public_key_sha256 == key_fp)
        ):
            raise ConflictError("this public key is already certified", code="key_reused")
        old = s.get(Certificate, ident.serial_hex)
        device = s.get(Device, ident.device_id)
        assert old is not None
        assert device is not None
        ca = s.get(CertificateAuthority, old.ca_id)
        assert ca is not None
        if ca.status != "active" or ca.key_location != "platform":
            raise ConflictError(
                f"issuing CA {ca.id} cannot renew ({ca.status}, {ca.key_location} key)",
                code="ca_cannot_renew",
            )
        profile = _profile(ctx, ca)
        serial = pki.new_serial()
        cert = profile.issue(
            new_key,
            device_id=device.id,
            serial=serial,
            now=now,
            validity_days=ctx.settings.device_validity_days,
            batch_id=device.batch_id,
            manifest_sha256=bytes.fromhex(device.manifest_sha256),
            crl_url=crl_url(ctx, ca.id, serial),
        )
        der = cert.public_bytes(serialization.Encoding.DER)
        s.add(
            Certificate(
                serial_hex=format(serial, "x"),
                ca_id=ca.id,
                kind="device",
                device_id=device.id,
                subject_ca_id=None,
                der=der,
                public_key_sha256=key_fp,
                not_before=cert.not_valid_before_utc,
                not_after=cert.not_valid_after_utc,
                status="good",
                revoked_at=None,
                revocation_reason=None,
                created_at=now,
            )
        )
        principal = Principal(
            token_id="-",  # noqa: S106 - devices act without an API token
            role="device",
            subject=device.id,
            remote_addr=remote_addr,
        )
        audit.record(
            s,
            principal,
            "certificate.renewed",
            "device",
            device.id,
            now,
            old_serial=ident.serial_hex,
            serial=format(serial, "x"),
            ca_id=ca.id,
            key_fingerprint=key_fp,
        )
        chain = ca_chain(s, ca.id)
    return {
        "device_id": device.id,
        "serial": format(serial, "x"),
        "certificate_pem": _der_to_pem(der),
        "chain_pem": [pem(c) for c in chain[:-1]],
        "root_pem": pem(chain[-1]),
    }


def set_device_status(
    ctx: ServiceContext,
    principal: Principal,
    device_id: str,
    status: str,
    reason: str | None,
) -> dict[str, Any]:
    """Suspend, quarantine, decommission or re-activate a device (operator action, audited).

    Each change is appended to ``status_changes``; every server process closes the device's
    open connections when it sees it.
    """
    require(principal, "admin")
    if status not in ("active", "suspended", "quarantined", "decommissioned"):
        raise ValidationError(
            "status must be active, suspended, quarantined or decommissioned", code="bad_status"
        )
    if reason is not None and (len(reason) > 200 or not reason.isprintable()):
        raise ValidationError("reason must be at most 200 printable characters")
    now = ctx.clock.now()
    with ctx.transaction() as s:
        d = s.get(Device, device_id)
        if d is None:
            raise NotFoundError(f"device {device_id} not found", code="device_not_found")
        if d.status in ("decommissioned", "revoked") and status != d.status:
            raise ConflictError(f"device is {d.status}; that is final", code="status_final")
        previous = d.status
        if previous != status:
            d.status = status
            d.status_reason = reason
            s.add(
                StatusChange(
                    device_id=device_id,
                    serial_hex=None,
                    status=status,
                    reason=reason,
                    created_at=now,
                )
            )
            audit.record(
                s,
                principal,
                f"device.{status}" if status != "active" else "device.reactivated",
                "device",
                device_id,
                now,
                previous=previous,
                reason=reason,
            )
        return {"device_id": device_id, "status": status, "previous": previous}


def status_changes_since(
    ctx: ServiceContext, after_id: int, limit: int = 1000
) -> list[tuple[int, str | None, str]]:
    with ctx.sessions() as s:
        return [
            (r[0], r[1], r[2])
            for r in s.execute(
                select(StatusChange.id, StatusChange.device_id, StatusChange.status)
                .where(StatusChange.id > after_id)
                .order_by(StatusChange.id)
                .limit(limit)
            )
        ]


def latest_status_change(ctx: ServiceContext) -> int:
    with ctx.sessions() as s:
        return int(s.scalar(select(func.max(StatusChange.id))) or 0)


# --- the gateway's own TLS credential ----------------------------------------------------------


@dataclass(frozen=True)
class GatewayCredential:
    key_path: str
    cert_chain_path: str  # server certificate followed by the fleet CA
    client_ca_path: str  # root + every active CA, for client-certificate chain building
    root_pem: str


def ensure_gateway_credential(
    ctx: ServiceContext, *, dns_names: list[str], ip_addresses: list[str]
) -> GatewayCredential:
    """Reuse or issue the gateway's server certificate (fleet CA, server profile).

    The TLS key is always an encrypted key file in the data directory (Python's ssl module cannot
    use a PKCS#11 key), whichever key store the CAs use.
    """
    import ipaddress

    from fleettrust.services.context import read_keystore_passphrase
    from fleettrust.signing.filekeys import FileKeyStore

    now = ctx.clock.now()
    names = {"dns": sorted(dns_names), "ip": sorted(ip_addresses)}
    passphrase = read_keystore_passphrase(ctx.settings)
    store = FileKeyStore(ctx.settings.keys_dir, passphrase)
    with ctx.transaction() as s:
        fca = fleet_ca(s)
        current = s.scalars(
            select(ServerCredential)
            .where(ServerCredential.purpose == "gateway")
            .order_by(ServerCredential.created_at.desc())
        ).first()
        if current is None or current.names != names or current.not_after - now < RENEW_BEFORE:
            signer = store.generate("gateway-tls")
            assert fca.key_id is not None
            u = urls(ctx, fca.id)
            serial = pki.new_serial()
            cert = pki.issue_server_certificate(
                ctx.signer(fca.key_id),
                x509.load_der_x509_certificate(fca.certificate_der or b""),
                signer.public_key(),
                dns_names=dns_names,
                ip_addresses=[ipaddress.ip_address(i) for i in ip_addresses],
                organization=ctx.settings.organization,
                serial=serial,
                now=now,
                validity_days=397,
                crl_url=u["crl"],
                ocsp_url=u["ocsp"],
                ca_issuers_url=u["ca_issuers"],
            )
            der = cert.public_bytes(serialization.Encoding.DER)
            current = ServerCredential(
                id=new_id("srv"),
                purpose="gateway",
                key_id=signer.key_id,
                certificate_der=der,
                names=names,
                not_after=cert.not_valid_after_utc,
                created_at=now,
            )
            s.add(current)
            s.add(
                Certificate(
                    serial_hex=format(serial, "x"),
                    ca_id=fca.id,
                    kind="server",
                    device_id=None,
                    subject_ca_id=None,
                    der=der,
                    public_key_sha256=pki.public_key_fingerprint(signer.public_key()),
                    not_before=cert.not_valid_before_utc,
                    not_after=cert.not_valid_after_utc,
                    status="good",
                    revoked_at=None,
                    revocation_reason=None,
                    created_at=now,
                )
            )
            audit.record(
                s,
                Principal("-", "system", "fleettrust"),
                "gateway.certificate",
                "server",
                current.id,
                now,
                serial=format(serial, "x"),
                names=names,
            )
        chain = ca_chain(s, fca.id)
        cas = [
            c.certificate_der
            for c in s.scalars(
                select(CertificateAuthority).where(
                    CertificateAuthority.status == "active",
                    CertificateAuthority.certificate_der.is_not(None),
                )
            )
        ]
        server_pem = _der_to_pem(current.certificate_der)
        key_id = current.key_id
    gw_dir = ctx.settings.data_dir / "gateway"
    gw_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    chain_path = gw_dir / "server-chain.pem"
    _write(chain_path, server_pem + "".join(pem(c) for c in chain[:-1]))
    client_ca = gw_dir / "client-ca.pem"
    _write(client_ca, "".join(_der_to_pem(d) for d in cas if d))
    return GatewayCredential(
        key_path=str(store.path_for(key_id)),
        cert_chain_path=str(chain_path),
        client_ca_path=str(client_ca),
        root_pem=pem(chain[-1]),
    )


def ca_ids_by_key_id(ctx: ServiceContext) -> dict[str, str]:
    """Subject key identifier (hex) -> CA id of every CA with a certificate (revoked included):
    lets the gateway name a client certificate's issuing CA from its AKI without a query."""
    with ctx.sessions() as s:
        return {
            ski: ca_id
            for ca_id, ski in s.execute(
                select(CertificateAuthority.id, CertificateAuthority.subject_key_id).where(
                    CertificateAuthority.subject_key_id.is_not(None)
                )
            )
            if ski
        }


def active_ca_pems(ctx: ServiceContext) -> list[str]:
    with ctx.sessions() as s:
        return [
            _der_to_pem(c.certificate_der)
            for c in s.scalars(
                select(CertificateAuthority).where(CertificateAuthority.status == "active")
            )
            if c.certificate_der
        ]


def _write(path: Any, text: str) -> None:
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
