"""The offline root: create it, and sign the fleet CA's CSR with it. Runs only on the offline
ceremony machine (``fleettrust ca init-root`` / ``fleettrust ca sign``), never in the server.

A root directory holds ``root.pem`` (public), ``root.json`` (where the key is, its fingerprint)
and either ``root.key.pem`` (PKCS#8, encrypted with the ceremony passphrase) or nothing more when
the key lives in a PKCS#11 token. ``issued.jsonl`` records every certificate the root signed.
This module does not talk to the server or its database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleettrust import pki
from fleettrust.errors import ConflictError, ValidationError
from fleettrust.signing.base import Signer, SignerAlgorithm
from fleettrust.signing.filekeys import (
    generate_private_key,
    load_encrypted_key,
    write_encrypted_key,
)

ROOT_CERT = "root.pem"
ROOT_KEY = "root.key.pem"
ROOT_META = "root.json"
ISSUED_LOG = "issued.jsonl"
MIN_PASSPHRASE_BYTES = 12


@dataclass(frozen=True)
class RootInfo:
    directory: Path
    certificate: x509.Certificate
    fingerprint: str
    key_backend: str


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def init_root(
    directory: Path,
    *,
    passphrase: bytes | None,
    now: dt.datetime,
    common_name: str = "Fleet Root CA",
    organization: str = "fleettrust fleet",
    algorithm: SignerAlgorithm = SignerAlgorithm.EC_P384,
    validity_days: int = 9125,
    pkcs11: object | None = None,
) -> RootInfo:
    """Create a new root CA in ``directory`` (which must not already hold one)."""
    if pkcs11 is None and (not passphrase or len(passphrase) < MIN_PASSPHRASE_BYTES):
        raise ValidationError(
            f"the root key passphrase must have at least {MIN_PASSPHRASE_BYTES} characters",
            code="weak_passphrase",
        )
    if pkcs11 is not None:
        from fleettrust.signing.pkcs11 import Pkcs11Config

        if not isinstance(pkcs11, Pkcs11Config):
            raise TypeError("pkcs11 must be a Pkcs11Config")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if any((directory / name).exists() for name in (ROOT_CERT, ROOT_META, ROOT_KEY)):
        raise ConflictError(f"{directory} already holds a root CA; refusing to overwrite it",
                            code="root_exists")
    with contextlib.ExitStack() as stack:
        signer: Signer
        meta: dict[str, str]
        if pkcs11 is not None:
            from fleettrust.signing.pkcs11 import Pkcs11KeyStore

            store = stack.enter_context(Pkcs11KeyStore(pkcs11))
            signer = store.generate("root-ca", algorithm)
            meta = {"key_backend": "pkcs11", "key_id": signer.key_id, "module": pkcs11.module,
                    "token_label": pkcs11.token_label}
        else:
            assert passphrase is not None  # checked above
            key = generate_private_key(algorithm)
            write_encrypted_key(directory / ROOT_KEY, key, passphrase)
            signer = load_encrypted_key(directory / ROOT_KEY, passphrase)
            meta = {"key_backend": "file", "key_file": ROOT_KEY}
        cert = pki.build_root_certificate(
            signer, common_name=common_name, organization=organization, now=now,
            validity_days=validity_days,
        )
    fp = pki.fingerprint_sha256(cert)
    meta.update({"fingerprint_sha256": fp, "created_at": now.isoformat(),
                 "algorithm": algorithm.value})
    _atomic_write(directory / ROOT_CERT, cert.public_bytes(serialization.Encoding.PEM))
    _atomic_write(directory / ROOT_META, json.dumps(meta, indent=2).encode())
    return RootInfo(directory, cert, fp, meta["key_backend"])


def load_root(directory: Path, *, passphrase: bytes | None,
              pkcs11_pin: str | None = None) -> tuple[x509.Certificate, Signer]:
    """The root certificate and a signer for its key (checked to match ``root.pem``).

    For a PKCS#11 root the token session stays open for the rest of the process; use
    :func:`open_root` to close it when done.
    """
    stack = contextlib.ExitStack()
    return _load_root(directory, passphrase, pkcs11_pin, stack)


@contextlib.contextmanager
def open_root(directory: Path, *, passphrase: bytes | None,
              pkcs11_pin: str | None = None) -> Iterator[tuple[x509.Certificate, Signer]]:
    """Like :func:`load_root`, releasing the PKCS#11 token session on exit."""
    with contextlib.ExitStack() as stack:
        yield _load_root(directory, passphrase, pkcs11_pin, stack)


def _load_root(directory: Path, passphrase: bytes | None, pkcs11_pin: str | None,
               stack: contextlib.ExitStack) -> tuple[x509.Certificate, Signer]:
    try:
        meta = json.loads((directory / ROOT_META).read_text())
        cert = x509.load_pem_x509_certificate((directory / ROOT_CERT).read_bytes())
    except FileNotFoundError as exc:
        raise ValidationError(f"{directory} is not a root CA directory ({exc.filename} missing)",
                              code="not_root_dir") from exc
    except (ValueError, json.JSONDecodeError) as exc:
        raise ValidationError(f"root CA directory {directory} is corrupt: {exc}",
                              code="root_dir_corrupt") from exc
    signer: Signer
    if meta.get("key_backend") == "pkcs11":
        from fleettrust.signing.pkcs11 import Pkcs11Config, Pkcs11KeyStore

        if not pkcs11_pin:
            raise ValidationError("the root key is in a PKCS#11 token: give its PIN",
                                  code="pin_required")
        store = stack.enter_context(Pkcs11KeyStore(Pkcs11Config(
            module=meta["module"], token_label=meta["token_label"], user_pin=pkcs11_pin)))
        signer = store.load(meta["key_id"])
    else:
        if not passphrase:
            raise ValidationError("the root key passphrase is required", code="passphrase_required")
        signer = load_encrypted_key(directory / ROOT_KEY, passphrase)
    if pki.public_key_fingerprint(signer.public_key()) != pki.public_key_fingerprint(
        cert.public_key()
    ):
        raise ValidationError("root key does not match root.pem", code="root_key_mismatch")
    return cert, signer


def sign_ca_csr(
    directory: Path,
    csr_pem: bytes,
    *,
    passphrase: bytes | None,
    now: dt.datetime,
    path_length: int | None = 2,
    validity_days: int = 5475,
    crl_url: str | None = None,
    pkcs11_pin: str | None = None,
    common_name: str | None = None,
) -> x509.Certificate:
    """Sign an intermediate (fleet) CA CSR with the offline root; log it in issued.jsonl.

    The CSR's signature and key type are checked before the root key is even unlocked; only its
    common name is taken from it (unless ``common_name`` is given).
    """
    csr = pki.load_csr(csr_pem)
    pki.check_key_allowed(csr.public_key())
    cns = csr.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = common_name or (str(cns[0].value) if cns else "Fleet CA")
    with open_root(directory, passphrase=passphrase, pkcs11_pin=pkcs11_pin) as (root, signer):
        org_attrs = root.subject.get_attributes_for_oid(x509.NameOID.ORGANIZATION_NAME)
        org = str(org_attrs[0].value) if org_attrs else "fleettrust fleet"
        cert = pki.issue_ca_certificate(
            signer, root, csr.public_key(), common_name=cn, organization=org,
            path_length=path_length, serial=pki.new_serial(), now=now,
            validity_days=validity_days, crl_url=crl_url, ocsp_url=None, ca_issuers_url=None,
        )
    entry = {"serial": format(cert.serial_number, "x"), "subject": cert.subject.rfc4514_string(),
             "not_after": cert.not_valid_after_utc.isoformat(), "signed_at": now.isoformat(),
             "fingerprint_sha256": pki.fingerprint_sha256(cert)}
    with open(directory / ISSUED_LOG, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return cert


ROOT_CRL_STATE = "crl.json"


def root_crl(
    directory: Path,
    *,
    passphrase: bytes | None,
    now: dt.datetime,
    revoke: list[tuple[int, str]] | None = None,
    validity_days: int = 180,
    pkcs11_pin: str | None = None,
) -> x509.CertificateRevocationList:
    """Sign the root's CRL (offline): everything revoked so far plus ``revoke`` (serial,
    RFC 5280 reason) pairs. The state (CRL number, revoked serials) is kept in ``crl.json``
    in the root directory, so numbers only grow and revocations are never forgotten.

    Profile (ADR 0008): complete CRL, no Issuing Distribution Point (the root and the fleet CA
    certificate carry no CRL DP, and OpenSSL refuses an IDP-scoped CRL for such certificates),
    Authority Key Identifier, CRL Number; upload it to the server (``POST /v1/crl/root``).
    """
    from fleettrust.revocation import crl as crlmod
    from fleettrust.services.revocation import REASONS

    if not 1 <= validity_days <= 3650:
        raise ValidationError("validity_days must be between 1 and 3650", code="bad_validity")
    state_path = directory / ROOT_CRL_STATE
    state: dict[str, object] = {"number": 0, "revoked": []}
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except ValueError as exc:
            raise ValidationError(f"{state_path} is corrupt: {exc}",
                                  code="root_dir_corrupt") from exc
    listed = {int(str(e["serial"]), 16): e for e in state["revoked"]}  # type: ignore[attr-defined]
    for serial, reason in revoke or []:
        if serial <= 0:
            raise ValidationError("serial numbers are positive", code="bad_serial")
        if reason not in REASONS or reason == "certificateHold":
            raise ValidationError(f"unknown revocation reason {reason!r}", code="bad_reason")
        listed.setdefault(serial, {"serial": format(serial, "x"), "reason": reason,
                                   "revoked_at": now.replace(microsecond=0).isoformat()})
    number = int(state["number"]) + 1  # type: ignore[call-overload]
    entries = [crlmod.CrlEntry(s, dt.datetime.fromisoformat(str(e["revoked_at"])),
                               str(e["reason"])) for s, e in listed.items()]
    with open_root(directory, passphrase=passphrase, pkcs11_pin=pkcs11_pin) as (root, signer):
        crl = signer.sign_crl(crlmod.build_complete_crl(
            root, entries, crl_number=number, this_update=now,
            next_update=now + dt.timedelta(days=validity_days), scope=crlmod.Scope(None)))
    new_state = {"number": number, "revoked": sorted(listed.values(),
                                                     key=lambda e: str(e["serial"]))}
    _atomic_write(state_path, json.dumps(new_state, indent=2).encode(), mode=0o600)
    return crl
