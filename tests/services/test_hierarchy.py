"""The online hierarchy: fleet CA import, factories (platform and external keys), batches.

Real components only: SQLite and PostgreSQL (the ``db_url`` fixture), encrypted key files,
a SoftHSM2 token for external factory keys, ``openssl verify`` and pkilint. The one fault
injection (an exception in the middle of creating a factory) stands for a failure that cannot
be caused from outside.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, MetaData, select

from fleettrust import ceremony, pki
from fleettrust.errors import (
    AuthorizationError,
    ConflictError,
    FleetTrustError,
    PolicyError,
    ValidationError,
)
from fleettrust.services import audit, hierarchy, issuance
from fleettrust.services.auth import Principal, authenticate
from fleettrust.services.context import ServiceContext
from fleettrust.signing.filekeys import FileKeyStore
from fleettrust.signing.pkcs11 import Pkcs11KeyStore
from fleettrust.storage.models import CertificateAuthority, Factory
from tests.conftest import (
    KEYSTORE_PASSPHRASE,
    ROOT_PASSPHRASE,
    Hierarchy,
    device_csr,
    make_principal,
    manifest,
)
from tests.pkilint_helpers import assert_pkilint_clean_cert, assert_pkilint_clean_chain
from tests.softhsm import make_softhsm_token, softhsm_available

SQLITE_ONLY = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
PG_ONLY = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


# --- helpers shared with the other service tests ------------------------------------------------


def db_snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table (reflected, so nothing is forgotten), in a stable order."""
    meta = MetaData()
    meta.reflect(engine)
    out: dict[str, list[tuple[Any, ...]]] = {}
    with engine.connect() as conn:
        for name, table in sorted(meta.tables.items()):
            rows = conn.execute(select(table)).all()
            out[name] = sorted((tuple(r) for r in rows), key=repr)
    return out


def db_bytes(engine: Engine) -> bytes:
    """Every value of every column of every table, as bytes, for searching."""
    parts: list[bytes] = []
    for rows in db_snapshot(engine).values():
        for row in rows:
            for value in row:
                if isinstance(value, bytes | bytearray | memoryview):
                    parts.append(bytes(value))
                elif isinstance(value, dict | list):
                    parts.append(json.dumps(value).encode())
                elif value is not None:
                    parts.append(str(value).encode())
    return b"\x00".join(parts)


def key_files(ctx: ServiceContext) -> set[str]:
    return {p.name for p in ctx.settings.keys_dir.iterdir()}


def openssl_verify(tmp_path: Path, root: str, chain: list[str], leaf: str,
                   purpose: str | None = None) -> None:
    d = tmp_path / f"verify-{len(list(tmp_path.glob('verify-*')))}"
    d.mkdir()
    (d / "root.pem").write_text(root)
    (d / "chain.pem").write_text("".join(chain))
    (d / "leaf.pem").write_text(leaf)
    args = ["openssl", "verify", "-CAfile", str(d / "root.pem")]
    if chain:
        args += ["-untrusted", str(d / "chain.pem")]
    if purpose:
        args += ["-purpose", purpose]
    out = subprocess.run([*args, str(d / "leaf.pem")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def pem_of(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def code(exc: pytest.ExceptionInfo[FleetTrustError]) -> str:
    return exc.value.code


# Files opened by this process while recording (a permanent audit hook, idle otherwise).
_OPENED: list[str] | None = None


def _audit_hook(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event in ("open", "os.open") and args:
        path = args[0]
        if isinstance(path, str | bytes | os.PathLike):
            _OPENED.append(os.fsdecode(path))


sys.addaudithook(_audit_hook)


@contextmanager
def record_opened_files() -> Iterator[list[str]]:
    global _OPENED
    opened: list[str] = []
    _OPENED = opened
    try:
        yield opened
    finally:
        _OPENED = None


# --- fleet CA ------------------------------------------------------------------------------------


def test_fleet_ca_import_refusals_change_nothing(ctx: ServiceContext, admin: Principal,
                                                 tmp_path: Path) -> None:
    root_dir, other_dir = tmp_path / "root", tmp_path / "other-root"
    root = ceremony.init_root(root_dir, passphrase=ROOT_PASSPHRASE, now=now())
    ceremony.init_root(other_dir, passphrase=ROOT_PASSPHRASE, now=now(),
                       common_name="Some Other Root")
    csr = hierarchy.create_fleet_csr(ctx, admin, "Fleet CA")
    root_pem = pem_of(root.certificate)

    def sign(directory: Path, csr_pem: str, **kw: Any) -> str:
        return pem_of(ceremony.sign_ca_csr(directory, csr_pem.encode(),
                                           passphrase=ROOT_PASSPHRASE, now=now(), **kw))

    # a certificate for another key, properly signed by the root
    other_key = FileKeyStore(tmp_path / "elsewhere", b"x" * 16).generate("other")
    other_csr = pki.build_ca_csr(other_key, common_name="Fleet CA", organization="o")
    for_other_key = sign(root_dir, other_csr.public_bytes(serialization.Encoding.PEM).decode())
    # the right key, signed by a different root
    by_other_root = sign(other_dir, csr)
    # the right key and root, but not a CA certificate
    with ceremony.open_root(root_dir, passphrase=ROOT_PASSPHRASE) as (root_cert, root_signer):
        ee = root_signer.sign_certificate(
            x509.CertificateBuilder()
            .issuer_name(root_cert.subject)
            .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Fleet CA")]))
            .public_key(x509.load_pem_x509_csr(csr.encode()).public_key())
            .serial_number(pki.new_serial())
            .not_valid_before(now() - dt.timedelta(minutes=1))
            .not_valid_after(now() + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
    # a fleet CA with pathLen 0 could never certify a factory CA
    path_len_0 = sign(root_dir, csr, path_length=0)
    good = sign(root_dir, csr)

    cases = [
        (for_other_key, root_pem, "key_mismatch"),
        (by_other_root, root_pem, "chain_invalid"),
        (pem_of(ee), root_pem, "not_ca"),
        (path_len_0, root_pem, "path_length_too_small"),
        (good, good, "not_root"),  # the "root" is not self-signed
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", root_pem,
         "cert_malformed"),
    ]
    before = db_snapshot(ctx.engine)
    for cert_pem, given_root, expected in cases:
        with pytest.raises(ValidationError) as exc:
            hierarchy.import_fleet_certificate(ctx, admin, cert_pem, given_root)
        assert code(exc) == expected, exc.value.message
        assert db_snapshot(ctx.engine) == before, f"refusal {expected} changed the database"

    res = hierarchy.import_fleet_certificate(ctx, admin, good, root_pem)
    assert res["root_fingerprint"] == root.fingerprint
    with ctx.transaction() as s:
        fleet = s.get(CertificateAuthority, res["fleet_ca_id"])
        root_row = s.get(CertificateAuthority, res["root_ca_id"])
        assert fleet is not None
        assert root_row is not None
        assert (fleet.status, fleet.parent_id, fleet.path_length) == ("active", root_row.id, 2)
        assert (root_row.key_location, root_row.key_id) == ("offline", None)
    with pytest.raises(ConflictError) as exc2:
        hierarchy.import_fleet_certificate(ctx, admin, good, root_pem)
    assert code(exc2) == "no_pending"
    with pytest.raises(ConflictError) as exc3:
        hierarchy.create_fleet_csr(ctx, admin, "Fleet CA")
    assert code(exc3) == "fleet_ca_exists"
    factory_tok = make_principal(ctx, "auditor", "eve")
    with pytest.raises(AuthorizationError):
        hierarchy.create_fleet_csr(ctx, factory_tok, "Fleet CA")


def test_server_never_reads_root_key(ctx: ServiceContext, admin: Principal,
                                     tmp_path: Path) -> None:
    """Ceremony, factory, batch and issuance: the root key is nowhere the server can see."""
    root_dir = tmp_path / "offline-root"
    vault = tmp_path / "vault"
    info = ceremony.init_root(root_dir, passphrase=ROOT_PASSPHRASE, now=now())
    with record_opened_files() as opened:
        csr = hierarchy.create_fleet_csr(ctx, admin, "Fleet CA")
    fleet_cert = ceremony.sign_ca_csr(root_dir, csr.encode(), passphrase=ROOT_PASSPHRASE,
                                      now=now())
    shutil.move(root_dir, vault)  # the root directory leaves: the server must not need it
    with record_opened_files() as opened_later:
        hierarchy.import_fleet_certificate(ctx, admin, pem_of(fleet_cert), pem_of(info.certificate))
        fac = hierarchy.create_factory(ctx, admin, name="Line A", batch_cas=True)
        bat = hierarchy.create_batch(ctx, admin, fac.factory.id, name="B1", product_model="M1",
                                     hardware_revision="r1", planned_size=10,
                                     manufactured_on=dt.date(2026, 1, 2), own_ca=True)
        issuance.issue_devices(ctx, admin, bat.batch.id,
                               [issuance.IssueRequest(csr=device_csr()[0], manifest=manifest())])
        issuance.issue_with_server_key(ctx, admin, bat.batch.id, manifest=manifest(),
                                       passphrase="device key passphrase")
    for path in opened + opened_later:
        assert not Path(path).resolve().is_relative_to(vault.resolve())
        assert "offline-root" not in path

    # Everything that identifies the root private key.
    key_pem = (vault / ceremony.ROOT_KEY).read_bytes()
    root_key = serialization.load_pem_private_key(key_pem, password=ROOT_PASSPHRASE)
    assert isinstance(root_key, ec.EllipticCurvePrivateKey)
    scalar = root_key.private_numbers().private_value.to_bytes(48, "big")
    pkcs8_der = root_key.private_bytes(serialization.Encoding.DER,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    plain_pem = root_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    needles = {
        "encrypted PEM": key_pem,
        "encrypted PEM body line": key_pem.splitlines()[1],
        "plain PEM body line": plain_pem.splitlines()[1],
        "PKCS#8 DER": pkcs8_der,
        "raw private scalar": scalar,
        "private scalar hex": scalar.hex().encode(),
        "private scalar HEX": scalar.hex().upper().encode(),
        "root passphrase": ROOT_PASSPHRASE,
    }

    def search(blob: bytes, where: str) -> None:
        for what, needle in needles.items():
            assert needle not in blob, f"{what} of the root key found in {where}"

    # 1. Every file under the data directory (and the SQLite database files).
    files = [p for p in ctx.settings.data_dir.rglob("*") if p.is_file()]
    files += list(tmp_path.glob("fleettrust.db*"))
    assert files
    for f in files:
        search(f.read_bytes(), str(f))
    # ... and no key in the server's key store is the root key.
    root_fp = pki.public_key_fingerprint(info.certificate.public_key())
    store = FileKeyStore(ctx.settings.keys_dir, KEYSTORE_PASSPHRASE.encode())
    stored_keys = sorted(ctx.settings.keys_dir.glob("*.pem"))
    assert len(stored_keys) == 3  # fleet, factory and batch CA
    for f in stored_keys:
        signer = store.load(f"file:{f.stem}")
        assert pki.public_key_fingerprint(signer.public_key()) != root_fp
    # 2. Every column of every table.
    search(db_bytes(ctx.engine), "the database")
    with ctx.transaction() as s:
        root_rows = s.scalars(select(CertificateAuthority).where(
            CertificateAuthority.kind == "root")).all()
        assert [(r.key_location, r.key_id) for r in root_rows] == [("offline", None)]
    # 3. The server's configuration has no setting that could point at the root directory.
    for f in dataclasses.fields(ctx.settings):
        assert "root" not in f.name
        value = repr(getattr(ctx.settings, f.name))
        assert str(vault) not in value
        assert "offline-root" not in value
    for name, value in os.environ.items():
        if name.startswith("FLEETTRUST_"):
            assert "offline-root" not in value
            assert str(vault) not in value


# --- factories -----------------------------------------------------------------------------------


def ca_cert(ctx: ServiceContext, ca_id: str) -> x509.Certificate:
    with ctx.transaction() as s:
        ca = s.get(CertificateAuthority, ca_id)
        assert ca is not None
        return hierarchy.load_ca_cert(ca)


@SQLITE_ONLY
def test_platform_factories_path_length_and_scoped_token(ctx: ServiceContext, admin: Principal,
                                                         fleet: Hierarchy) -> None:
    plain = hierarchy.create_factory(ctx, admin, name="Plain Line")
    with_batches = hierarchy.create_factory(ctx, admin, name="Batch Line", batch_cas=True)
    for created, path_len in ((plain, 0), (with_batches, 1)):
        cert = ca_cert(ctx, created.ca.id)
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert (bc.ca, bc.path_length) == (True, path_len)
        assert cert.issuer == ca_cert(ctx, fleet.fleet_ca_id).subject
        assert created.factory.status == "active"
        assert created.ca.key_location == "platform"
        assert created.ca.key_id is not None
        assert ctx.settings.keys_dir.joinpath(created.ca.key_id.split(":", 1)[1] + ".pem").exists()
        with ctx.transaction() as s:
            who = authenticate(s, created.token, now())
        assert (who.role, who.factory_id) == ("factory", created.factory.id)
    # A factory credential cannot create factories.
    with pytest.raises(AuthorizationError) as exc:
        hierarchy.create_factory(ctx, make_principal(ctx, "factory", "s", plain.factory.id),
                                 name="Rogue")
    assert code(exc) == "role_not_allowed"


@SQLITE_ONLY
def test_duplicate_and_bad_names_refused(ctx: ServiceContext, admin: Principal,
                                         fleet: Hierarchy) -> None:
    f1 = hierarchy.create_factory(ctx, admin, name="Dup Line")
    before = key_files(ctx)
    with pytest.raises(ConflictError) as exc:
        hierarchy.create_factory(ctx, admin, name="Dup Line", batch_cas=True)
    assert code(exc) == "factory_exists"
    assert key_files(ctx) == before
    for bad in ("", " leading", "x" * 101, "semi;colon", "A" * 60):
        with pytest.raises(ValidationError):
            hierarchy.create_factory(ctx, admin, name=bad)
    f2 = hierarchy.create_factory(ctx, admin, name="Other Line")
    # Every character the name rule allows works end to end (CA name, token, audit).
    odd = hierarchy.create_factory(ctx, admin, name="Line (B)/2 v1.0_x-y")
    assert odd.factory.status == "active"
    with ctx.transaction() as s:
        assert authenticate(s, odd.token, now()).factory_id == odd.factory.id

    def batch(factory_id: str, name: str) -> hierarchy.BatchCreated:
        return hierarchy.create_batch(ctx, admin, factory_id, name=name, product_model="M",
                                      hardware_revision="r1", planned_size=5,
                                      manufactured_on=dt.date(2026, 3, 1))

    batch(f1.factory.id, "B-1")
    with pytest.raises(ConflictError) as exc2:
        batch(f1.factory.id, "B-1")
    assert code(exc2) == "batch_exists"
    batch(f2.factory.id, "B-1")  # the same name in another factory is fine
    with pytest.raises(ValidationError):
        hierarchy.create_batch(ctx, admin, f1.factory.id, name="B-2", product_model="M",
                               hardware_revision="r1", planned_size=0,
                               manufactured_on=dt.date(2026, 3, 1))


@SQLITE_ONLY
def test_factory_creation_failing_midway_leaves_no_key_and_no_rows(
    ctx: ServiceContext, admin: Principal, fleet: Hierarchy, monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys_before, db_before = key_files(ctx), db_snapshot(ctx.engine)

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("audit store unavailable")

    # The last step of each operation fails, after the CA key was generated and the CA signed.
    monkeypatch.setattr(audit, "record", boom)
    with pytest.raises(RuntimeError):
        hierarchy.create_factory(ctx, admin, name="Doomed Line", batch_cas=True)
    assert key_files(ctx) == keys_before
    assert db_snapshot(ctx.engine) == db_before
    monkeypatch.undo()

    fac = hierarchy.create_factory(ctx, admin, name="Line", batch_cas=True)
    keys_before, db_before = key_files(ctx), db_snapshot(ctx.engine)
    monkeypatch.setattr(audit, "record", boom)
    with pytest.raises(RuntimeError):
        hierarchy.create_batch(ctx, admin, fac.factory.id, name="Doomed", product_model="M",
                               hardware_revision="r", planned_size=3,
                               manufactured_on=dt.date(2026, 1, 1), own_ca=True)
    assert key_files(ctx) == keys_before
    assert db_snapshot(ctx.engine) == db_before


@PG_ONLY
def test_factory_name_race_leaves_no_orphan_key(ctx: ServiceContext, admin: Principal,
                                                fleet: Hierarchy) -> None:
    """Another server takes the name between our check and our INSERT (real concurrency)."""
    keys_before = key_files(ctx)
    real_generate = ctx.key_store.generate
    racer_id: list[str] = []

    def generate_while_another_server_commits(label: str, *a: Any) -> Any:
        signer = real_generate(label, *a)
        # A second, independent transaction (another connection) creates the same name.
        with ctx.transaction() as other:
            other.add(Factory(id="fac_racer", name="Contested", ca_id=fleet.fleet_ca_id,
                              batch_cas=False, key_location="platform", status="active",
                              created_at=now()))
        racer_id.append("fac_racer")
        return signer

    ctx.key_store.generate = generate_while_another_server_commits  # type: ignore[method-assign]
    try:
        with pytest.raises(ConflictError) as exc:
            hierarchy.create_factory(ctx, admin, name="Contested")
    finally:
        del ctx.key_store.generate  # type: ignore[method-assign]
    assert code(exc) == "factory_exists"
    assert racer_id == ["fac_racer"]
    assert key_files(ctx) == keys_before
    with ctx.transaction() as s:
        assert [f.id for f in s.scalars(select(Factory))] == ["fac_racer"]
        assert s.scalars(select(CertificateAuthority).where(
            CertificateAuthority.kind == "factory")).all() == []


@SQLITE_ONLY
@pytest.mark.pkcs11
@pytest.mark.skipif(not softhsm_available(), reason="SoftHSM2 not installed")
def test_external_factory_key_in_softhsm(ctx: ServiceContext, admin: Principal,
                                         fleet: Hierarchy, tmp_path: Path) -> None:
    keys_before = key_files(ctx)
    created = hierarchy.create_factory(ctx, admin, name="Partner Fab", key_location="external")
    assert created.factory.status == "pending_ca"
    assert (created.ca.status, created.ca.key_id) == ("pending", None)
    assert key_files(ctx) == keys_before  # the platform generated no key for it
    fid = created.factory.id
    station = make_principal(ctx, "factory", "fab-station", fid)

    # The factory makes its CA key in its own token and sends a CSR.
    store = Pkcs11KeyStore(make_softhsm_token(tmp_path, "partner-fab"))
    token_signer = store.generate("factory-ca")
    csr = pki.build_ca_csr(token_signer, common_name="ignored", organization="ignored")
    csr_pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    der = csr.public_bytes(serialization.Encoding.DER)
    tampered = x509.load_der_x509_csr(der.replace(b"ignored", b"ignoreD", 1))
    with pytest.raises(ValidationError) as exc:
        hierarchy.sign_factory_csr(ctx, station, fid,
                                   tampered.public_bytes(serialization.Encoding.PEM).decode())
    assert code(exc) == "csr_bad_signature"

    chain = hierarchy.sign_factory_csr(ctx, station, fid, csr_pem)
    factory_ca = x509.load_pem_x509_certificate(chain[0].encode())
    assert factory_ca.public_key() == token_signer.public_key()
    bc = factory_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (bc.ca, bc.path_length) == (True, 0)
    cns = factory_ca.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [a.value for a in cns] == ["Partner Fab Issuing CA"]  # the CSR's subject is ignored
    assert len(chain) == 3
    assert chain[-1] == pem_of(fleet.root_cert)
    openssl_verify(tmp_path, chain[-1], chain[1:-1], chain[0])
    with pytest.raises(ConflictError) as exc2:
        hierarchy.sign_factory_csr(ctx, admin, fid, csr_pem)
    assert code(exc2) == "ca_exists"

    # The factory can issue with its own token; openssl accepts root -> fleet -> factory -> device.
    profile = pki.DeviceProfile(token_signer, factory_ca, organization="fleettrust fleet",
                                ocsp_url=None, ca_issuers_url=None)
    device = profile.issue(ec.generate_private_key(ec.SECP256R1()).public_key(),
                           device_id="fab-0001", serial=pki.new_serial(), now=now(),
                           validity_days=365, batch_id="bat_x", manifest_sha256=bytes(32),
                           crl_url=None)
    openssl_verify(tmp_path, chain[-1], chain[:-1], pem_of(device), purpose="sslclient")

    # ... but the platform cannot issue into its batches: it does not hold the key.
    bat = hierarchy.create_batch(ctx, station, fid, name="P-1", product_model="M",
                                 hardware_revision="r1", planned_size=5,
                                 manufactured_on=dt.date(2026, 5, 1))
    with pytest.raises(PolicyError) as exc3:
        issuance.issue_devices(ctx, station, bat.batch.id,
                               [issuance.IssueRequest(csr=device_csr()[0], manifest=manifest())])
    assert code(exc3) == "factory_key_external"
    with pytest.raises(PolicyError) as exc4:
        hierarchy.create_batch(ctx, station, fid, name="P-2", product_model="M",
                               hardware_revision="r1", planned_size=5,
                               manufactured_on=dt.date(2026, 5, 1), own_ca=True)
    assert code(exc4) == "batch_cas_disabled"
    # pathLen 1 is never given to a CA whose key the platform does not hold.
    with pytest.raises(PolicyError) as exc5:
        hierarchy.create_factory(ctx, admin, name="Partner Fab 2", key_location="external",
                                 batch_cas=True)
    assert code(exc5) == "factory_key_external"
    # A key that is already certified is not certified again for another factory.
    second = hierarchy.create_factory(ctx, admin, name="Partner Fab 3", key_location="external")
    with pytest.raises(PolicyError) as exc6:
        hierarchy.sign_factory_csr(ctx, admin, second.factory.id, csr_pem)
    assert code(exc6) == "key_reused"
    store.close()


@SQLITE_ONLY
def test_factory_credential_cannot_act_on_another_factory(
    ctx: ServiceContext, admin: Principal, fleet: Hierarchy,
    factory: hierarchy.FactoryCreated, batch: hierarchy.BatchCreated,
) -> None:
    other = hierarchy.create_factory(ctx, admin, name="Other Fab", key_location="external")
    intruder = make_principal(ctx, "factory", "intruder", other.factory.id)
    own_station = make_principal(ctx, "factory", "own-station", factory.factory.id)
    calls: list[Callable[[], object]] = [
        lambda: hierarchy.create_batch(ctx, intruder, factory.factory.id, name="X",
                                       product_model="M", hardware_revision="r",
                                       planned_size=1, manufactured_on=dt.date(2026, 1, 1)),
        lambda: issuance.issue_devices(ctx, intruder, batch.batch.id, [
            issuance.IssueRequest(csr=device_csr()[0], manifest=manifest())]),
        lambda: issuance.issue_with_server_key(ctx, intruder, batch.batch.id,
                                               manifest=manifest(), passphrase="p" * 20),
        lambda: hierarchy.sign_factory_csr(ctx, own_station, other.factory.id,
                                           device_csr()[0]),
    ]
    db_before = db_snapshot(ctx.engine)
    for call in calls:
        with pytest.raises(AuthorizationError) as exc:
            call()
        assert code(exc) == "wrong_factory"
    assert db_snapshot(ctx.engine) == db_before


# --- batches -------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_batch_ca_requires_batch_cas(ctx: ServiceContext, admin: Principal,
                                     fleet: Hierarchy) -> None:
    plain = hierarchy.create_factory(ctx, admin, name="No Batch CAs")
    keys_before, db_before = key_files(ctx), db_snapshot(ctx.engine)
    with pytest.raises(PolicyError) as exc:
        hierarchy.create_batch(ctx, admin, plain.factory.id, name="B", product_model="M",
                               hardware_revision="r1", planned_size=5,
                               manufactured_on=dt.date(2026, 1, 1), own_ca=True)
    assert code(exc) == "batch_cas_disabled"
    assert key_files(ctx) == keys_before
    assert db_snapshot(ctx.engine) == db_before


@SQLITE_ONLY
def test_batch_ca_chain_openssl_and_pkilint(ctx: ServiceContext, admin: Principal,
                                            fleet: Hierarchy, factory: hierarchy.FactoryCreated,
                                            factory_principal: Principal, tmp_path: Path) -> None:
    own = hierarchy.create_batch(ctx, factory_principal, factory.factory.id, name="B-own",
                                 product_model="TH-100", hardware_revision="r2", planned_size=5,
                                 manufactured_on=dt.date(2026, 11, 20), own_ca=True)
    shared = hierarchy.create_batch(ctx, factory_principal, factory.factory.id, name="B-shared",
                                    product_model="TH-100", hardware_revision="r2",
                                    planned_size=5, manufactured_on=dt.date(2026, 11, 20))
    assert own.batch.ca_id != factory.ca.id
    assert shared.batch.ca_id == factory.ca.id

    def issue(batch_id: str) -> issuance.IssueResult:
        return issuance.issue_devices(ctx, factory_principal, batch_id, [
            issuance.IssueRequest(csr=device_csr()[0], manifest=manifest())])

    res_own, res_shared = issue(own.batch.id), issue(shared.batch.id)
    # root -> fleet -> factory -> batch -> device
    assert len(res_own.chain_pem) == 3
    assert len(res_shared.chain_pem) == 2
    batch_ca = x509.load_pem_x509_certificate(res_own.chain_pem[0].encode())
    bc = batch_ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert (bc.ca, bc.path_length) == (True, 0)
    assert batch_ca.issuer == ca_cert(ctx, factory.ca.id).subject
    for res in (res_own, res_shared):
        assert res.root_pem == pem_of(fleet.root_cert)
        openssl_verify(tmp_path, res.root_pem, res.chain_pem, res.devices[0].certificate_pem,
                       purpose="sslclient")
        leaf = x509.load_pem_x509_certificate(res.devices[0].certificate_pem.encode())
        pki.verify_chain(leaf, [x509.load_pem_x509_certificate(c.encode())
                                for c in res.chain_pem], fleet.root_cert, now=now())

    # pkilint: every profile the hierarchy produced, and every issuer/subject pair.
    root = res_own.root_pem
    fleet_pem, factory_pem, batch_pem = res_own.chain_pem[2], res_own.chain_pem[1], \
        res_own.chain_pem[0]
    device_own, device_shared = res_own.devices[0].certificate_pem, \
        res_shared.devices[0].certificate_pem
    for cert in (root, fleet_pem, factory_pem, batch_pem, device_own, device_shared):
        assert_pkilint_clean_cert(cert)
    for issuer, subject in ((root, fleet_pem), (fleet_pem, factory_pem), (factory_pem, batch_pem),
                            (batch_pem, device_own), (factory_pem, device_shared)):
        assert_pkilint_clean_chain(issuer, subject)


@PG_ONLY
def test_concurrent_batches_two_threads(ctx: ServiceContext, admin: Principal,
                                        fleet: Hierarchy, factory: hierarchy.FactoryCreated,
                                        factory_principal: Principal) -> None:
    """Two creators racing for the same batch name: exactly one wins, the other gets a
    precise conflict and no orphan key."""
    keys_before = key_files(ctx)
    results: list[object] = []
    barrier = threading.Barrier(2)

    def create() -> None:
        barrier.wait()
        try:
            results.append(hierarchy.create_batch(
                ctx, factory_principal, factory.factory.id, name="Same", product_model="M",
                hardware_revision="r", planned_size=3, manufactured_on=dt.date(2026, 1, 1),
                own_ca=True))
        except FleetTrustError as exc:
            results.append(exc)

    threads = [threading.Thread(target=create) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if isinstance(r, hierarchy.BatchCreated)]
    failed = [r for r in results if isinstance(r, FleetTrustError)]
    assert len(ok) == 1
    assert [e.code for e in failed] == ["batch_exists"]
    assert len(key_files(ctx) - keys_before) == 1  # only the winner's batch CA key
