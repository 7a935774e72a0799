"""The online part of the hierarchy: fleet CA ceremony steps, factories and their CAs, batches.

The server never holds the root key. The fleet CA key is generated in the server's key store; its
CSR leaves for the offline root and the signed certificate comes back through
:func:`import_fleet_certificate`, which checks it matches the pending key and chains to the root
it is imported with. Factory and batch CAs are signed by the fleet / factory CA online; a factory
whose CA key lives in its own PKCS#11 token submits a CSR instead (:func:`sign_factory_csr`).

Path lengths: the fleet CA needs pathLen >= 1 (2 when batches get CAs); a factory CA has pathLen 0,
or 1 when batch CAs are enabled (only for keys the platform holds); a batch CA has pathLen 0.
An operation that creates a key and then fails deletes the key again: no orphan keys, no rows.

Not here: device certificates (:mod:`fleettrust.services.issuance`), revocation, and anything
that needs the root's private key (:mod:`fleettrust.ceremony`, offline).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import secrets
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleettrust import pki
from fleettrust.errors import (
    AuthorizationError,
    ConflictError,
    KeyStoreError,
    NotFoundError,
    PolicyError,
    ValidationError,
)
from fleettrust.ids import new_id
from fleettrust.services import audit
from fleettrust.services.auth import Principal, create_token, require
from fleettrust.services.context import ServiceContext
from fleettrust.storage.models import Batch, Certificate, CertificateAuthority, Factory

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._()/-]{0,99}$")
SHORT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,49}$")


def _check_name(value: str, what: str, pattern: re.Pattern[str] = NAME_RE) -> str:
    if not pattern.match(value):
        raise ValidationError(
            f"{what} {value!r} is not allowed: letters, digits and . _ - ( ) / space, "
            f"at most {100 if pattern is NAME_RE else 50} characters",
            code="bad_name",
        )
    return value


def pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_ca_cert(ca: CertificateAuthority) -> x509.Certificate:
    if ca.certificate_der is None:
        raise ConflictError(f"CA {ca.id} has no certificate yet", code="ca_pending")
    return x509.load_der_x509_certificate(ca.certificate_der)


def ca_chain(session: Session, ca_id: str) -> list[x509.Certificate]:
    """Certificates from ``ca_id`` up to and including the root (issuing CA first)."""
    chain: list[x509.Certificate] = []
    current: str | None = ca_id
    while current is not None:
        ca = session.get(CertificateAuthority, current)
        if ca is None:
            raise NotFoundError(f"CA {current} not found")
        chain.append(load_ca_cert(ca))
        current = ca.parent_id
        if len(chain) > 6:
            raise ConflictError("CA chain too long (loop?)")
    return chain


def _active_ca(session: Session, kind: str) -> CertificateAuthority | None:
    return session.scalars(
        select(CertificateAuthority).where(
            CertificateAuthority.kind == kind, CertificateAuthority.status == "active"
        )
    ).first()


def fleet_ca(session: Session) -> CertificateAuthority:
    ca = _active_ca(session, "fleet")
    if ca is None:
        raise ConflictError(
            "no active fleet CA: run `fleettrust ca fleet-csr`, sign it with the offline root"
            " (`fleettrust ca sign`) and `fleettrust ca import-fleet`",
            code="no_fleet_ca",
        )
    return ca


def urls(ctx: ServiceContext, ca_id: str) -> dict[str, str]:
    base = ctx.settings.base_url
    return {
        "crl": f"{base}/crl/{ca_id}.crl",
        "ocsp": f"{base}/ocsp",
        "ca_issuers": f"{base}/ca/{ca_id}.der",
    }


def crl_shard_urls(ctx: ServiceContext, ca_id: str) -> list[str]:
    """The CRL distribution point of every shard of ``ca_id``'s CRL, indexed by shard number.

    A certificate with serial ``s`` is listed on shard ``s % len(result)``.
    """
    return [_crl_shard_url(ctx, ca_id, shard) for shard in range(ctx.settings.crl_shards)]


def crl_url(ctx: ServiceContext, ca_id: str, serial: int) -> str:
    """CRL distribution point of one certificate: its issuer's shard chosen by serial."""
    return _crl_shard_url(ctx, ca_id, serial % ctx.settings.crl_shards)


def _crl_shard_url(ctx: ServiceContext, ca_id: str, shard: int) -> str:
    return f"{ctx.settings.base_url}/crl/{ca_id}/{shard}.crl"


def _discard_key(ctx: ServiceContext, key_id: str | None) -> None:
    """Step back after a failed operation: destroy the key it created (no orphan keys).

    A failure to delete is swallowed so the operation's own error is the one reported.
    """
    if key_id is not None:
        with contextlib.suppress(KeyStoreError):
            ctx.key_store.delete(key_id)


def _store_cert(
    session: Session,
    cert: x509.Certificate,
    *,
    issuer_ca_id: str,
    kind: str,
    now: dt.datetime,
    device_id: str | None = None,
    subject_ca_id: str | None = None,
) -> None:
    session.add(
        Certificate(
            serial_hex=format(cert.serial_number, "x"),
            ca_id=issuer_ca_id,
            kind=kind,
            device_id=device_id,
            subject_ca_id=subject_ca_id,
            der=cert.public_bytes(serialization.Encoding.DER),
            public_key_sha256=pki.public_key_fingerprint(cert.public_key()),
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            status="good",
            revoked_at=None,
            revocation_reason=None,
            created_at=now,
        )
    )


def _ski(cert: x509.Certificate) -> str:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()
    return ext.value.digest.hex()


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_certified(session: Session, public_key: Any) -> bool:
    fp = pki.public_key_fingerprint(public_key)
    return session.scalars(
        select(Certificate.serial_hex).where(Certificate.public_key_sha256 == fp).limit(1)
    ).first() is not None


# --- fleet CA ceremony -------------------------------------------------------------------------


def create_fleet_csr(ctx: ServiceContext, principal: Principal, common_name: str) -> str:
    """Generate (or reuse) the pending fleet CA key; return its CSR in PEM for the offline root."""
    require(principal, "admin")
    _check_name(common_name, "common name")
    now = ctx.clock.now()
    created_keys: list[str] = []
    try:
        return _create_fleet_csr(ctx, principal, common_name, now, created_keys)
    except BaseException:
        for key_id in created_keys:  # step back: no orphan key for a CA row that was not stored
            _discard_key(ctx, key_id)
        raise


def _create_fleet_csr(
    ctx: ServiceContext, principal: Principal, common_name: str, now: dt.datetime,
    created_keys: list[str],
) -> str:
    with ctx.transaction() as session:
        if _active_ca(session, "fleet") is not None:
            raise ConflictError("an active fleet CA already exists", code="fleet_ca_exists")
        pending = session.scalars(
            select(CertificateAuthority).where(
                CertificateAuthority.kind == "fleet", CertificateAuthority.status == "pending"
            )
        ).first()
        if pending is None:
            signer = ctx.key_store.generate("fleet-ca")
            created_keys.append(signer.key_id)
            pending = CertificateAuthority(
                id=new_id("ca"),
                kind="fleet",
                name=common_name,
                parent_id=None,
                key_location="platform",
                key_id=signer.key_id,
                status="pending",
                path_length=None,
                created_at=now,
            )
            session.add(pending)
        assert pending.key_id is not None
        signer = ctx.signer(pending.key_id)
        csr = pki.build_ca_csr(
            signer, common_name=pending.name, organization=ctx.settings.organization
        )
        audit.record(
            session, principal, "fleet_ca.csr", "ca", pending.id, now, key_id=pending.key_id
        )
        return csr.public_bytes(serialization.Encoding.PEM).decode()


def import_fleet_certificate(
    ctx: ServiceContext, principal: Principal, certificate_pem: str, root_pem: str
) -> dict[str, Any]:
    """Activate the pending fleet CA with the certificate the offline root signed."""
    require(principal, "admin")
    now = ctx.clock.now()
    try:
        cert = x509.load_pem_x509_certificate(certificate_pem.encode())
        root = x509.load_pem_x509_certificate(root_pem.encode())
    except ValueError as exc:
        raise ValidationError(f"not a PEM certificate: {exc}", code="cert_malformed") from exc
    with ctx.transaction() as session:
        pending = session.scalars(
            select(CertificateAuthority).where(
                CertificateAuthority.kind == "fleet", CertificateAuthority.status == "pending"
            )
        ).first()
        if pending is None or pending.key_id is None:
            raise ConflictError("no pending fleet CA: create its CSR first", code="no_pending")
        signer = ctx.signer(pending.key_id)
        if pki.public_key_fingerprint(cert.public_key()) != pki.public_key_fingerprint(
            signer.public_key()
        ):
            raise ValidationError(
                "certificate is not for the pending fleet CA key", code="key_mismatch"
            )
        # The root: self-issued, self-signed and a CA (the public part is all the server gets).
        root_bc = _basic_constraints(root)
        if root.subject != root.issuer or root_bc is None or not root_bc.ca:
            raise ValidationError("the root certificate is not a self-signed CA",
                                  code="not_root")
        try:
            root.verify_directly_issued_by(root)
            cert.verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            raise ValidationError(
                "the fleet CA certificate was not issued by this root", code="chain_invalid"
            ) from exc
        if not (cert.not_valid_before_utc <= now < cert.not_valid_after_utc):
            raise ValidationError("the fleet CA certificate is not valid now", code="cert_expired")
        bc = _basic_constraints(cert)
        if bc is None or not bc.ca:
            raise ValidationError("fleet certificate is not a CA", code="not_ca")
        if bc.path_length is not None and bc.path_length < 1:
            raise ValidationError(
                "the fleet CA certificate has pathLenConstraint 0: it could not certify factory"
                " CAs (sign it with path length 1, or 2 for batch CAs)",
                code="path_length_too_small",
            )
        root_ca = session.scalars(
            select(CertificateAuthority).where(
                CertificateAuthority.kind == "root",
                CertificateAuthority.subject_key_id == _ski(root),
            )
        ).first()
        if root_ca is None:
            root_ca = CertificateAuthority(
                id=new_id("ca"),
                kind="root",
                name=root.subject.rfc4514_string(),
                parent_id=None,
                key_location="offline",
                key_id=None,
                status="active",
                path_length=None,
                certificate_der=root.public_bytes(serialization.Encoding.DER),
                serial_hex=format(root.serial_number, "x"),
                subject_key_id=_ski(root),
                not_after=root.not_valid_after_utc,
                created_at=now,
            )
            session.add(root_ca)
            session.flush()
        pending.parent_id = root_ca.id
        pending.status = "active"
        pending.certificate_der = cert.public_bytes(serialization.Encoding.DER)
        pending.serial_hex = format(cert.serial_number, "x")
        pending.subject_key_id = _ski(cert)
        pending.not_after = cert.not_valid_after_utc
        pending.path_length = bc.path_length
        _store_cert(session, cert, issuer_ca_id=root_ca.id, kind="ca", now=now,
                    subject_ca_id=pending.id)
        audit.record(
            session, principal, "fleet_ca.import", "ca", pending.id, now,
            serial=pending.serial_hex, root_fingerprint=pki.fingerprint_sha256(root),
        )
        return {
            "fleet_ca_id": pending.id,
            "root_ca_id": root_ca.id,
            "root_fingerprint": pki.fingerprint_sha256(root),
        }


# --- factories ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactoryCreated:
    factory: Factory
    ca: CertificateAuthority
    token: str


def _issue_sub_ca(
    ctx: ServiceContext,
    session: Session,
    parent: CertificateAuthority,
    public_key: Any,
    *,
    common_name: str,
    path_length: int,
    now: dt.datetime,
) -> x509.Certificate:
    if parent.status != "active" or parent.key_id is None:
        raise ConflictError(f"issuing CA {parent.id} cannot sign (status {parent.status})")
    issuer_cert = load_ca_cert(parent)
    parent_urls = urls(ctx, parent.id)
    return pki.issue_ca_certificate(
        ctx.signer(parent.key_id),
        issuer_cert,
        public_key,
        common_name=common_name,
        organization=ctx.settings.organization,
        path_length=path_length,
        serial=pki.new_serial(),
        now=now,
        validity_days=ctx.settings.ca_validity_days,
        crl_url=parent_urls["crl"],
        ocsp_url=parent_urls["ocsp"],
        ca_issuers_url=parent_urls["ca_issuers"],
    )


def _activate_ca(ca: CertificateAuthority, cert: x509.Certificate) -> None:
    ca.status = "active"
    ca.certificate_der = cert.public_bytes(serialization.Encoding.DER)
    ca.serial_hex = format(cert.serial_number, "x")
    ca.subject_key_id = _ski(cert)
    ca.not_after = cert.not_valid_after_utc


FACTORY_CA_SUFFIX = " Issuing CA"
BATCH_CA_SUFFIX = " Batch CA"
_CN_MAX = 64  # ub-common-name (RFC 5280)


def _ca_common_name(name: str, suffix: str, what: str) -> str:
    cn = f"{name}{suffix}"
    if len(cn) > _CN_MAX:
        raise ValidationError(
            f"{what} {name!r} is too long for its CA's common name: at most"
            f" {_CN_MAX - len(suffix)} characters",
            code="bad_name",
        )
    return cn


def create_factory(
    ctx: ServiceContext,
    principal: Principal,
    *,
    name: str,
    batch_cas: bool = False,
    key_location: str = "platform",
) -> FactoryCreated:
    """Create a factory, its issuing CA (unless the factory keeps the key) and its credential.

    The factory CA has pathLen 0, or 1 when ``batch_cas`` lets batches have their own CA (which
    the platform signs, so it needs the factory CA key in the platform key store).
    """
    require(principal, "admin")
    _check_name(name, "factory name")
    ca_name = _ca_common_name(name, FACTORY_CA_SUFFIX, "factory name")
    if key_location not in ("platform", "external"):
        raise ValidationError("key_location must be 'platform' or 'external'")
    if batch_cas and key_location != "platform":
        # pathLen 1 on a CA whose key we do not hold would let the factory mint sub-CAs nobody
        # here knows about; batch CAs are signed by the platform anyway.
        raise PolicyError("batch CAs need the factory CA key in the platform key store",
                          code="factory_key_external")
    now = ctx.clock.now()
    created_key: str | None = None
    try:
        with ctx.transaction() as session:
            parent = fleet_ca(session)
            if session.scalars(select(Factory.id).where(Factory.name == name)).first():
                raise ConflictError(f"a factory named {name!r} exists", code="factory_exists")
            factory_id = new_id("fac")
            ca = CertificateAuthority(
                id=new_id("ca"),
                kind="factory",
                name=ca_name,
                parent_id=parent.id,
                factory_id=factory_id,
                key_location=key_location,
                key_id=None,
                status="pending",
                path_length=1 if batch_cas else 0,
                created_at=now,
            )
            cert: x509.Certificate | None = None
            if key_location == "platform":
                signer = ctx.key_store.generate(f"factory-{factory_id}")
                created_key = signer.key_id
                ca.key_id = signer.key_id
                cert = _issue_sub_ca(
                    ctx, session, parent, signer.public_key(),
                    common_name=ca.name, path_length=ca.path_length or 0, now=now,
                )
                _activate_ca(ca, cert)
            session.add(ca)
            session.flush()
            if cert is not None:
                _store_cert(session, cert, issuer_ca_id=parent.id, kind="ca", now=now,
                            subject_ca_id=ca.id)
            factory = Factory(
                id=factory_id,
                name=name,
                ca_id=ca.id,
                batch_cas=batch_cas,
                key_location=key_location,
                status="active" if cert is not None else "pending_ca",
                created_at=now,
            )
            session.add(factory)
            _, token = create_token(
                session, role="factory", subject=f"factory {factory_id}", now=now,
                factory_id=factory_id,
            )
            session.flush()
            audit.record(
                session, principal, "factory.create", "factory", factory_id, now,
                name=name, ca_id=ca.id, key_location=key_location, batch_cas=batch_cas,
                ca_serial=ca.serial_hex,
            )
            return FactoryCreated(factory=factory, ca=ca, token=token)
    except IntegrityError as exc:  # a concurrent request took the name after our check
        _discard_key(ctx, created_key)
        raise ConflictError(f"a factory named {name!r} exists", code="factory_exists") from exc
    except BaseException:
        _discard_key(ctx, created_key)  # step back: no orphan key for a factory that is not
        raise


def sign_factory_csr(
    ctx: ServiceContext, principal: Principal, factory_id: str, csr_pem: str
) -> list[str]:
    """Sign the CA CSR of a factory that keeps its CA key in its own token; return the chain.

    The chain is PEM, the new factory CA first, the root last. The CSR's subject and requested
    extensions are ignored: the certificate is built from the factory's record.
    """
    require(principal, "admin", "factory")
    check_factory_scope(principal, factory_id)
    now = ctx.clock.now()
    csr = pki.load_csr(csr_pem)
    public_key = csr.public_key()
    pki.check_key_allowed(public_key)
    with ctx.transaction() as session:
        factory = session.get(Factory, factory_id)
        if factory is None:
            raise NotFoundError(f"factory {factory_id} not found")
        ca = session.get(CertificateAuthority, factory.ca_id)
        if ca is None:
            raise NotFoundError(f"CA of factory {factory_id} not found")
        if factory.key_location != "external":
            raise ConflictError("this factory's CA key is in the platform key store",
                                code="not_external")
        if ca.status != "pending":
            raise ConflictError("the factory CA already has a certificate", code="ca_exists")
        if _key_certified(session, public_key):
            raise PolicyError("this public key is already certified; a new CA needs a new key",
                              code="key_reused")
        parent = fleet_ca(session)
        cert = _issue_sub_ca(
            ctx, session, parent, public_key,
            common_name=ca.name, path_length=ca.path_length or 0, now=now,
        )
        _activate_ca(ca, cert)
        factory.status = "active"
        _store_cert(session, cert, issuer_ca_id=parent.id, kind="ca", now=now,
                    subject_ca_id=ca.id)
        audit.record(
            session, principal, "factory.ca_signed", "factory", factory_id, now,
            ca_id=ca.id, serial=ca.serial_hex,
            key_fingerprint=pki.public_key_fingerprint(public_key),
        )
        return [pem(c) for c in ca_chain(session, ca.id)]


def check_factory_scope(principal: Principal, factory_id: str) -> None:
    """A factory credential acts only on its own factory; other allowed roles pass."""
    if principal.role == "factory" and principal.factory_id != factory_id:
        raise AuthorizationError(
            "this factory credential is scoped to another factory", code="wrong_factory"
        )


# --- batches -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchCreated:
    batch: Batch
    group_secret: str | None


def create_batch(
    ctx: ServiceContext,
    principal: Principal,
    factory_id: str,
    *,
    name: str,
    product_model: str,
    hardware_revision: str,
    planned_size: int,
    manufactured_on: dt.date,
    own_ca: bool = False,
    auth_method: str = "certificate",
) -> BatchCreated:
    require(principal, "admin", "factory")
    check_factory_scope(principal, factory_id)
    _check_name(name, "batch name")
    _check_name(product_model, "product model", SHORT_RE)
    _check_name(hardware_revision, "hardware revision", SHORT_RE)
    if not 1 <= planned_size <= 10_000_000:
        raise ValidationError("planned_size must be between 1 and 10,000,000")
    if auth_method not in ("certificate", "shared_secret"):
        raise ValidationError("auth_method must be 'certificate' or 'shared_secret'")
    if own_ca and auth_method != "certificate":
        raise ValidationError("a shared-secret batch has no certificates, so no CA of its own")
    bca_name = _ca_common_name(name, BATCH_CA_SUFFIX, "batch name") if own_ca else None
    now = ctx.clock.now()
    created_key: str | None = None
    try:
        with ctx.transaction() as session:
            factory = session.get(Factory, factory_id)
            if factory is None:
                raise NotFoundError(f"factory {factory_id} not found")
            if factory.status != "active":
                raise ConflictError(f"factory {factory_id} is {factory.status}",
                                    code="factory_not_active")
            if session.scalars(
                select(Batch.id).where(Batch.factory_id == factory_id, Batch.name == name)
            ).first():
                raise ConflictError(f"factory already has a batch named {name!r}",
                                    code="batch_exists")
            factory_ca = session.get(CertificateAuthority, factory.ca_id)
            if factory_ca is None:
                raise NotFoundError(f"CA of factory {factory_id} not found")
            batch_id = new_id("bat")
            ca_id = factory_ca.id
            if bca_name is not None:
                if not factory.batch_cas:
                    raise PolicyError(
                        "this factory's CA has pathLen 0: create the factory with batch CAs"
                        " enabled to give batches their own CA", code="batch_cas_disabled",
                    )
                if factory.key_location != "platform":
                    raise PolicyError("batch CAs need the factory CA key in the platform store",
                                      code="factory_key_external")
                signer = ctx.key_store.generate(f"batch-{batch_id}")
                created_key = signer.key_id
                bca = CertificateAuthority(
                    id=new_id("ca"), kind="batch", name=bca_name,
                    parent_id=factory_ca.id, factory_id=factory_id, batch_id=batch_id,
                    key_location="platform", key_id=signer.key_id, status="pending",
                    path_length=0, created_at=now,
                )
                cert = _issue_sub_ca(ctx, session, factory_ca, signer.public_key(),
                                     common_name=bca.name, path_length=0, now=now)
                _activate_ca(bca, cert)
                session.add(bca)
                session.flush()
                _store_cert(session, cert, issuer_ca_id=factory_ca.id, kind="ca", now=now,
                            subject_ca_id=bca.id)
                ca_id = bca.id
            group_secret: str | None = None
            sealed: bytes | None = None
            if auth_method == "shared_secret":
                group_secret = secrets.token_urlsafe(32)
                sealed = ctx.secret_box.seal(group_secret.encode(), batch_id.encode())
            batch = Batch(
                id=batch_id, factory_id=factory_id, name=name, product_model=product_model,
                hardware_revision=hardware_revision, planned_size=planned_size, issued_count=0,
                manufactured_on=manufactured_on, ca_id=ca_id, own_ca=own_ca,
                auth_method=auth_method, group_secret_enc=sealed, status="active",
                created_at=now,
            )
            session.add(batch)
            session.flush()
            audit.record(
                session, principal, "batch.create", "batch", batch_id, now,
                factory_id=factory_id, name=name, product_model=product_model,
                hardware_revision=hardware_revision, planned_size=planned_size,
                manufactured_on=manufactured_on.isoformat(), own_ca=own_ca, ca_id=ca_id,
                auth_method=auth_method,
            )
            return BatchCreated(batch=batch, group_secret=group_secret)
    except IntegrityError as exc:  # a concurrent request took the name after our check
        _discard_key(ctx, created_key)
        raise ConflictError(f"factory already has a batch named {name!r}",
                            code="batch_exists") from exc
    except BaseException:
        _discard_key(ctx, created_key)  # step back: no orphan key for a batch that is not
        raise
