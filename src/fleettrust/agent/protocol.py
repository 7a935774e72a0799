"""The device side of docs/device-protocol.md: request bodies, response parsing, error classes.

Shared by the agent (:mod:`fleettrust.agent.runner`, synchronous) and the fleet simulator
(:mod:`fleettrust.agent.simulator`, asyncio) so both speak exactly the same protocol:

* :func:`build_checkin_body` / :func:`parse_checkin_response` — ``POST /v1/device/checkin``;
* :func:`build_renew_request` / :func:`parse_renew_response` — ``POST /v1/device/renew``; the
  response is checked before anything is stored: the certificate is for the new key, names the
  same device, the root is the PINNED root (a renewal can never move the trust anchor), and the
  certificate chains to it;
* :func:`classify_response` / :func:`classify_transport_error` — every failure becomes a
  :class:`GatewayError` with a stable ``code`` and a ``kind``: ``transient`` (network, TLS,
  timeouts, 5xx, 408, 429 — retried with back-off) or ``refused`` (401/403 problem documents
  such as ``device_suspended`` and other 4xx — logged precisely, retried slowly);
* :func:`system_health` / :func:`system_uptime_s` — the ``health`` and ``uptime_s`` fields.

No sockets here (the HTTP client lives in the runner and the simulator) and no state writes.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fleettrust.agent.identity import (
    DeviceKey,
    build_csr,
    make_renew_proof,
    public_key_matches,
    sign_manifest,
)
from fleettrust.agent.state import StateError, check_chain, parse_time
from fleettrust.errors import FleetTrustError
from fleettrust.pki.chain import fingerprint_sha256
from fleettrust.pki.manifest import Manifest

__all__ = [
    "CHECKIN_PATH",
    "MAX_BODY_BYTES",
    "MAX_NEXT_CHECKIN_S",
    "PERMANENT_REFUSALS",
    "RENEW_PATH",
    "CheckinResponse",
    "GatewayError",
    "RenewedIdentity",
    "ResponseLike",
    "build_checkin_body",
    "build_renew_request",
    "classify_exception",
    "classify_response",
    "classify_transport_error",
    "parse_checkin_response",
    "parse_renew_response",
    "system_health",
    "system_uptime_s",
]

CHECKIN_PATH: Final = "/v1/device/checkin"
RENEW_PATH: Final = "/v1/device/renew"
MAX_BODY_BYTES: Final = 64 * 1024
MAX_NEXT_CHECKIN_S: Final = 7 * 24 * 3600
MAX_METRICS: Final = 32
_MAX_INT: Final = 2**53

#: Refusal codes that will not heal by themselves (an operator must act).
PERMANENT_REFUSALS: Final = frozenset({
    "certificate_unknown", "certificate_revoked", "device_unknown", "device_decommissioned",
    "device_revoked",
})  # fmt: skip

ErrorKind = Literal["transient", "refused"]


class _HeadersLike(Protocol):
    def get(self, key: str, default: None = None) -> str | None: ...


class ResponseLike(Protocol):
    """What the parsers read from an answer: ``httpx.Response`` or the simulator's own."""

    @property
    def status_code(self) -> int: ...

    @property
    def content(self) -> bytes: ...

    @property
    def headers(self) -> _HeadersLike: ...


class GatewayError(FleetTrustError):
    """A check-in or renewal that did not succeed; ``kind`` says how to retry."""

    status = 502
    code = "gateway_error"

    def __init__(
        self,
        message: str,
        *,
        code: str,
        kind: ErrorKind,
        http_status: int | None = None,
        detail: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.kind: ErrorKind = kind
        self.http_status = http_status
        self.detail = detail
        self.retry_after_s = retry_after_s

    @property
    def permanent(self) -> bool:
        return self.kind == "refused" and self.code in PERMANENT_REFUSALS


# --- check-in --------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def system_uptime_s(proc: Path = Path("/proc")) -> int | None:
    """Seconds since boot from ``/proc/uptime`` (None if unavailable)."""
    text = _read(proc / "uptime")
    if not text:
        return None
    try:
        return max(0, int(float(text.split()[0])))
    except (ValueError, IndexError):
        return None


def system_health(proc: Path = Path("/proc"), extra: Mapping[str, float] | None = None
                  ) -> dict[str, Any]:
    """``{"status": "ok", "metrics": {...}}`` from /proc/loadavg and /proc/meminfo (+ extra)."""
    metrics: dict[str, float] = {}
    loadavg = _read(proc / "loadavg")
    if loadavg:
        parts = loadavg.split()
        for name, value in zip(("load1", "load5", "load15"), parts[:3], strict=False):
            with contextlib.suppress(ValueError):
                metrics[name] = float(value)
    meminfo = _read(proc / "meminfo")
    if meminfo:
        for line in meminfo.splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                with contextlib.suppress(ValueError, IndexError):
                    metrics[f"{name.lower()}_kb"] = float(rest.split()[0])
    for extra_name, extra_value in (extra or {}).items():
        if len(metrics) >= MAX_METRICS:
            break
        if math.isfinite(extra_value):
            metrics[extra_name] = extra_value
    return {"status": "ok", "metrics": dict(list(metrics.items())[:MAX_METRICS])}


def build_checkin_body(
    *,
    key: DeviceKey,
    manifest: Manifest,
    firmware_version: str,
    boot_counter: int,
    uptime_s: int,
    agent_generation: int,
    health: Mapping[str, Any] | None = None,
    manifest_signature: str | None = None,
) -> dict[str, Any]:
    """The check-in JSON object; signs the manifest unless ``manifest_signature`` is given."""
    if not 1 <= len(firmware_version) <= 64 or not firmware_version.isprintable():
        raise ValueError("firmware_version must be 1..64 printable characters")
    for name, value in (("boot_counter", boot_counter), ("uptime_s", uptime_s),
                        ("agent_generation", agent_generation)):
        if not 0 <= value <= _MAX_INT:
            raise ValueError(f"{name} must be in 0..2^53")
    return {
        "firmware_version": firmware_version,
        "boot_counter": boot_counter,
        "uptime_s": uptime_s,
        "agent_generation": agent_generation,
        "manifest": manifest.to_dict(),
        "manifest_signature": manifest_signature or sign_manifest(key, manifest),
        "health": dict(health) if health is not None else {"status": "ok", "metrics": {}},
    }


@dataclass(frozen=True, slots=True)
class CheckinResponse:
    """A parsed ``200`` check-in answer."""

    device_id: str
    status: str
    server_time: str | None
    next_checkin_s: float
    renew: bool
    actions: list[Any] = field(default_factory=list)

    def interval(self, *, minimum_s: float = 1.0, maximum_s: float = MAX_NEXT_CHECKIN_S
                 ) -> tuple[float, bool]:
        """``next_checkin_s`` clamped to ``[minimum_s, maximum_s]``, and whether it was."""
        value = min(max(self.next_checkin_s, minimum_s), maximum_s)
        return value, value != self.next_checkin_s


def _bad_response(what: str) -> GatewayError:
    return GatewayError(f"gateway sent an invalid response: {what}", code="bad_response",
                        kind="transient")


def _json_object(response: ResponseLike) -> dict[str, Any]:
    if len(response.content) > MAX_BODY_BYTES:
        raise _bad_response(f"body of {len(response.content)} bytes exceeds 64 KiB")
    try:
        doc = json.loads(response.content)
    except ValueError:
        raise _bad_response("body is not JSON") from None
    if not isinstance(doc, dict):
        raise _bad_response("body is not a JSON object")
    return doc


def parse_checkin_response(response: ResponseLike) -> CheckinResponse:
    """Parse a 200 answer (GatewayError ``bad_response`` if it does not match the protocol)."""
    doc = _json_object(response)
    device_id = doc.get("device_id")
    status = doc.get("status")
    next_s = doc.get("next_checkin_s")
    renew = doc.get("renew", False)
    actions = doc.get("actions", [])
    server_time = doc.get("server_time")
    if not isinstance(device_id, str) or not device_id:
        raise _bad_response("device_id missing")
    if not isinstance(status, str):
        raise _bad_response("status missing")
    if isinstance(next_s, bool) or not isinstance(next_s, int | float) or not math.isfinite(
        next_s
    ):
        raise _bad_response("next_checkin_s is not a number")
    if not isinstance(renew, bool):
        raise _bad_response("renew is not a boolean")
    if not isinstance(actions, list):
        raise _bad_response("actions is not a list")
    if server_time is not None and not isinstance(server_time, str):
        raise _bad_response("server_time is not a string")
    if next_s < 0:
        raise _bad_response("next_checkin_s is negative")
    return CheckinResponse(device_id=device_id, status=status, server_time=server_time,
                           next_checkin_s=float(next_s), renew=renew, actions=actions)


# --- errors ----------------------------------------------------------------------------------


def _retry_after(response: ResponseLike) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def classify_response(response: ResponseLike, what: str) -> GatewayError:
    """The GatewayError for a non-2xx answer, using the RFC 9457 ``code`` when present."""
    status = response.status_code
    code = f"http_{status}"
    detail: str | None = None
    try:
        doc = json.loads(response.content[:MAX_BODY_BYTES])
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        if isinstance(doc.get("code"), str) and doc["code"]:
            code = doc["code"]
        if isinstance(doc.get("detail"), str):
            detail = doc["detail"][:500]
    transient = status >= 500 or status in (408, 429)
    kind: ErrorKind = "transient" if transient else "refused"
    verb = "failed" if transient else "refused by gateway"
    text = f"{what} {verb}: HTTP {status} {code}" + (f" — {detail}" if detail else "")
    return GatewayError(text, code=code, kind=kind, http_status=status, detail=detail,
                        retry_after_s=_retry_after(response))


def _ssl_reason(exc: BaseException) -> str | None:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"server certificate rejected: {current.verify_message}"
        if isinstance(current, ssl.SSLError):
            return f"TLS error: {current.reason or current}"
        current = current.__cause__ or current.__context__
    text = str(exc)
    if "SSL" in text or "TLS" in text or "certificate" in text:
        return f"TLS error: {text}"
    return None


def classify_transport_error(exc: httpx.TransportError, what: str) -> GatewayError:
    """The (transient) GatewayError for a network/TLS failure, with the TLS reason if any."""
    reason = _ssl_reason(exc)
    if reason is not None:
        code = "tls_error"
    elif isinstance(exc, httpx.TimeoutException):
        code, reason = "timeout", f"timed out ({type(exc).__name__})"
    elif isinstance(exc, httpx.ConnectError):
        code, reason = "connect_error", f"cannot connect: {exc}"
    else:
        code, reason = "network_error", f"{type(exc).__name__}: {exc}"
    return GatewayError(f"{what} failed: {reason}", code=code, kind="transient")


def classify_exception(exc: BaseException, what: str, *, connecting: bool = False
                       ) -> GatewayError | None:
    """The (transient) GatewayError for a failure of a plain asyncio/ssl connection (the
    simulator's lean client): TLS, timeout, connect or network error; None if ``exc`` is none
    of those (a bug, to be raised)."""
    if isinstance(exc, httpx.TransportError):
        return classify_transport_error(exc, what)
    reason = _ssl_reason(exc) if isinstance(exc, ssl.SSLError) else None
    if reason is not None:
        code = "tls_error"
    elif isinstance(exc, TimeoutError):
        code, reason = "timeout", "timed out"
    elif connecting and isinstance(exc, OSError):
        code, reason = "connect_error", f"cannot connect: {exc}"
    elif isinstance(exc, OSError | EOFError):
        code, reason = "network_error", f"{type(exc).__name__}: {exc}"
    else:
        return None
    return GatewayError(f"{what} failed: {reason}", code=code, kind="transient")


# --- renewal ---------------------------------------------------------------------------------


def build_renew_request(
    current_key: DeviceKey, new_key: DeviceKey, device_id: str
) -> tuple[dict[str, str], x509.CertificateSigningRequest]:
    """``{"csr", "old_key_proof"}`` — CSR signed by the NEW key, proof by the CURRENT key."""
    csr = build_csr(new_key, device_id)
    body = {
        "csr": csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        "old_key_proof": make_renew_proof(current_key, csr),
    }
    return body, csr


@dataclass(frozen=True)
class RenewedIdentity:
    device_id: str
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]
    root: x509.Certificate


def _load_pem(text: object, what: str) -> list[x509.Certificate]:
    if not isinstance(text, str) or "-----BEGIN CERTIFICATE-----" not in text:
        raise _bad_response(f"{what} is not a PEM certificate")
    try:
        return x509.load_pem_x509_certificates(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise _bad_response(f"{what} is not a valid PEM certificate") from None


def parse_issued_identity(
    doc: Mapping[str, Any],
    *,
    certificate_pem: object,
    device_id: object,
    new_public_key: Any,
    pinned_root: x509.Certificate | None,
    expected_device_id: str | None,
    now: dt.datetime,
) -> RenewedIdentity:
    """Check an issued certificate (+ ``chain_pem``/``root_pem`` of ``doc``) before storing it.

    ``pinned_root=None`` means trust-on-install (factory enrollment): the root comes from the
    response; otherwise the response's root must be the pinned one."""
    certs = _load_pem(certificate_pem, "certificate_pem")
    if len(certs) != 1:
        raise _bad_response("certificate_pem must hold exactly one certificate")
    cert = certs[0]
    chain_raw = doc.get("chain_pem")
    if not isinstance(chain_raw, list) or not chain_raw:
        raise _bad_response("chain_pem must be a non-empty list")
    chain: list[x509.Certificate] = []
    for i, item in enumerate(chain_raw):
        chain.extend(_load_pem(item, f"chain_pem[{i}]"))
    roots = _load_pem(doc.get("root_pem"), "root_pem")
    if len(roots) != 1:
        raise _bad_response("root_pem must hold exactly one certificate")
    root = roots[0]
    if not isinstance(device_id, str) or not device_id:
        raise _bad_response("device_id missing")
    if expected_device_id is not None and device_id != expected_device_id:
        raise GatewayError(
            f"issued certificate is for device {device_id}, this device is {expected_device_id}",
            code="device_mismatch", kind="refused")
    if not public_key_matches(cert.public_key(), new_public_key):
        raise GatewayError("issued certificate is not for this device's key",
                           code="certificate_key_mismatch", kind="refused")
    if pinned_root is not None and fingerprint_sha256(root) != fingerprint_sha256(pinned_root):
        raise GatewayError(
            f"response names root {fingerprint_sha256(root)}, the pinned root is "
            f"{fingerprint_sha256(pinned_root)}: refusing to change the trust anchor",
            code="root_mismatch", kind="refused")
    anchor = pinned_root if pinned_root is not None else root
    # drop a root the server may have appended to the chain
    chain = [c for c in chain if c != anchor]
    try:
        check_chain(cert, chain, anchor, now)
    except StateError as exc:
        raise GatewayError(exc.message, code="chain_invalid", kind="refused") from exc
    return RenewedIdentity(device_id=device_id, certificate=cert, chain=tuple(chain), root=anchor)


def parse_renew_response(
    response: ResponseLike,
    *,
    new_key: DeviceKey,
    pinned_root: x509.Certificate,
    device_id: str,
    now: dt.datetime,
) -> RenewedIdentity:
    """Parse and check a 200 renewal answer (see :func:`parse_issued_identity`)."""
    doc = _json_object(response)
    return parse_issued_identity(
        doc, certificate_pem=doc.get("certificate_pem"), device_id=doc.get("device_id"),
        new_public_key=new_key.public_key(), pinned_root=pinned_root,
        expected_device_id=device_id, now=now)


def renewal_due(
    not_after: dt.datetime, now: dt.datetime, *, renew_before: dt.timedelta
) -> bool:
    """True when the certificate expires within ``renew_before``."""
    return not_after - now <= renew_before


def parse_server_time(text: str | None) -> dt.datetime | None:
    if text is None:
        return None
    try:
        return parse_time(text)
    except ValueError:
        return None
