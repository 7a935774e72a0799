"""Factory enrollment: create the device key and request, install the issued certificate.

Flow at the factory station:

1. :func:`enroll` — generate the device key (file, or on a PKCS#11 token), write the first
   ``state.json`` (phase ``enrolling``) and ``enroll-request.json`` = ``{"csr", "manifest"}``,
   exactly the body of the operator API's ``POST /v1/batches/{id}/devices``. Re-running it while
   still ``enrolling`` reuses the key (idempotent); once ``enrolled`` it refuses unless
   ``force=True`` (a new identity; the old files are removed after the switch).
2. The station submits the request (:func:`submit_enrollment` does it with a factory token).
3. :func:`install` — take the operator API response (``{devices: [{device_id, serial,
   certificate_pem}], chain_pem: [...], root_pem}``), pick the device whose certificate is for
   OUR key, check the chain against the response's root (trust on first install: the factory
   line is the trusted environment; ``expected_root_fingerprint`` pins it explicitly), then
   switch the state to ``enrolled`` atomically (see :mod:`fleettrust.agent.state`).

Each step is crash-safe: a kill leaves no state, the ``enrolling`` state, or the ``enrolled``
state. Not here: the check-in loop (``runner``), gathering the manifest (``manifest``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives import serialization

from fleettrust.agent.identity import (
    DeviceKey,
    FileDeviceKey,
    TokenDeviceKey,
    atomic_write_bytes,
    build_csr,
    public_key_matches,
)
from fleettrust.agent.protocol import GatewayError, parse_issued_identity
from fleettrust.agent.state import (
    ENROLL_REQUEST_FILE,
    AgentState,
    KeyRef,
    StateError,
    StateStore,
    new_state,
)
from fleettrust.errors import FleetTrustError
from fleettrust.pki.chain import fingerprint_sha256
from fleettrust.pki.manifest import Manifest

__all__ = [
    "EnrollRequest",
    "EnrollmentError",
    "enroll",
    "install",
    "submit_enrollment",
]


class EnrollmentError(FleetTrustError):
    """Enrollment could not complete (codes: ``already_enrolled``, ``no_matching_device``,
    ``bad_response``, ``root_mismatch``, ``chain_invalid``, ``operator_api_error``, …)."""

    status = 400
    code = "enrollment_failed"


@dataclass(frozen=True)
class EnrollRequest:
    """What the factory station submits: the CSR (PEM) and the normalised manifest."""

    csr_pem: str
    manifest: dict[str, Any]
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"csr": self.csr_pem, "manifest": self.manifest}


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def _make_key(
    store: StateStore, pkcs11: Any | None
) -> tuple[DeviceKey, KeyRef]:
    if pkcs11 is None:
        key = FileDeviceKey.generate()
        return key, KeyRef(kind="file", file=store.write_key(key))
    from fleettrust.signing.pkcs11 import Pkcs11Config, Pkcs11KeyStore

    if not isinstance(pkcs11, Pkcs11Config):
        raise TypeError("pkcs11 must be a Pkcs11Config")
    signer = Pkcs11KeyStore(pkcs11).generate("fleettrust-device")
    return TokenDeviceKey(signer), KeyRef(kind="pkcs11", key_id=signer.key_id,
                                          module=pkcs11.module, token_label=pkcs11.token_label)


def enroll(
    state_dir: Path,
    *,
    manifest: Manifest,
    manifest_override_file: Path | None = None,
    pkcs11: Any | None = None,
    gateway_url: str | None = None,
    operator_url: str | None = None,
    force: bool = False,
    now: dt.datetime | None = None,
    durable: bool = True,
    write_request: bool = True,
) -> EnrollRequest:
    """Create (or reuse, while still enrolling) the device key and the enrollment request.

    ``pkcs11`` is a :class:`fleettrust.signing.pkcs11.Pkcs11Config` to generate the key on a
    token (the PIN is used now and never stored)."""
    moment = _now(now)
    store = StateStore(state_dir, durable=durable)
    with store.locked():
        previous: AgentState | None = store.read() if store.exists() else None
        key: DeviceKey
        if previous is not None and previous.phase == "enrolled" and not force:
            raise EnrollmentError(
                f"{state_dir} already holds enrolled device {previous.device_id}; "
                "use --force to replace its identity",
                code="already_enrolled",
            )
        reuse = previous is not None and previous.phase == "enrolling" and not force and (
            (previous.key.kind == "file") == (pkcs11 is None)
        )
        if reuse and previous is not None and previous.key.kind == "file":
            identity = store.load()
            key, key_ref = identity.key, previous.key
        else:
            key, key_ref = _make_key(store, pkcs11)
        fresh = new_state(
            key=key_ref,
            manifest=manifest.to_dict(),
            now=moment,
            manifest_override_file=(
                str(manifest_override_file.resolve()) if manifest_override_file else None
            ),
            gateway_url=gateway_url or (previous.gateway_url if previous else None),
            operator_url=operator_url or (previous.operator_url if previous else None),
        )
        if previous is None:
            saved = store.create(fresh, now=moment)
        else:
            saved = store.save(
                fresh.evolve(generation=previous.generation,
                             boot_counter=previous.boot_counter),
                now=moment,
            )
        store.cleanup(saved)
        csr = build_csr(key)
        request = EnrollRequest(
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            manifest=manifest.to_dict(),
        )
        if write_request:
            path = store.directory / ENROLL_REQUEST_FILE
            atomic_write_bytes(path, json.dumps(request.to_json(), indent=2).encode() + b"\n",
                               mode=0o644, durable=durable)
            request = EnrollRequest(request.csr_pem, request.manifest, path)
        return request


def _normalize_fingerprint(text: str) -> str:
    return text.replace(":", "").replace(" ", "").upper()


def install(
    state_dir: Path,
    response: Mapping[str, Any],
    *,
    expected_root_fingerprint: str | None = None,
    pkcs11_pin: str | None = None,
    now: dt.datetime | None = None,
    durable: bool = True,
) -> AgentState:
    """Store the issued certificate, chain and root from an operator API response."""
    moment = _now(now)
    store = StateStore(state_dir, durable=durable)
    with store.locked():
        identity = store.load(pkcs11_pin=pkcs11_pin, now=moment)
        state = identity.state
        devices = response.get("devices")
        if not isinstance(devices, list) or not devices:
            raise EnrollmentError("response has no 'devices' list", code="bad_response")
        entry: Mapping[str, Any] | None = None
        for item in devices:
            if not isinstance(item, Mapping):
                continue
            try:
                cert = parse_issued_identity(
                    response, certificate_pem=item.get("certificate_pem"),
                    device_id=item.get("device_id"), new_public_key=identity.key.public_key(),
                    pinned_root=None, expected_device_id=None, now=moment)
            except GatewayError as exc:
                if exc.code == "certificate_key_mismatch":
                    continue
                raise EnrollmentError(exc.message, code=exc.code) from exc
            entry = item
            break
        if entry is None:
            raise EnrollmentError(
                f"none of the {len(devices)} certificate(s) in the response is for this "
                "device's key", code="no_matching_device")
        if state.phase == "enrolled":
            assert identity.certificate is not None
            if cert.certificate == identity.certificate:
                return state  # installing the same response twice is a no-op
            raise EnrollmentError(
                f"{state_dir} already holds enrolled device {state.device_id}",
                code="already_enrolled")
        if expected_root_fingerprint is not None and _normalize_fingerprint(
            fingerprint_sha256(cert.root)
        ) != _normalize_fingerprint(expected_root_fingerprint):
            raise EnrollmentError(
                f"the response's root {fingerprint_sha256(cert.root)} is not the expected "
                f"root {expected_root_fingerprint}", code="root_mismatch")
        if not public_key_matches(cert.certificate.public_key(), identity.key.public_key()):
            raise StateError("certificate is not for the device key", code="state_key_mismatch")
        return store.install_identity(
            state, key=identity.key, key_ref=state.key, device_id=cert.device_id,
            certificate=cert.certificate, chain=cert.chain, root=cert.root, now=moment)


def submit_enrollment(
    server: str,
    token: str,
    batch_id: str,
    request: EnrollRequest,
    *,
    station: str | None = None,
    timeout_s: float = 60.0,
    verify: bool | str = True,
) -> dict[str, Any]:
    """POST the request to ``{server}/v1/batches/{batch_id}/devices`` with a factory token."""
    body = request.to_json()
    if station is not None:
        body["station"] = station
    url = f"{server.rstrip('/')}/v1/batches/{batch_id}/devices"
    try:
        with httpx.Client(timeout=timeout_s, verify=verify, trust_env=False) as client:
            response = client.post(url, json=body, headers={
                "Authorization": f"Bearer {token}", "User-Agent": "fleettrust-agent"})
    except httpx.HTTPError as exc:
        raise EnrollmentError(f"cannot reach the operator API at {server}: {exc}",
                              code="operator_api_unreachable") from exc
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if response.status_code >= 400 or not isinstance(doc, dict):
        code = doc.get("code", "http_error") if isinstance(doc, dict) else "http_error"
        detail = doc.get("detail", "") if isinstance(doc, dict) else response.text[:200]
        lines = doc.get("errors") if isinstance(doc, dict) else None
        extra = f" {lines}" if lines else ""
        raise EnrollmentError(
            f"operator API refused the enrollment: HTTP {response.status_code} {code}: "
            f"{detail}{extra}", code="operator_api_error")
    return doc
