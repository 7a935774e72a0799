"""What a leaf of the transparency log holds: canonical JSON of one audit event (or a gap).

What this module does:

* :func:`canonical_json` — the byte encoding of every leaf: keys sorted, no insignificant
  whitespace, UTF-8, no NaN/Infinity. Leaves are stored and served as these exact bytes and the
  leaf hash is computed over them, so a reader never re-encodes anything to verify.
* :func:`event_entry` builds the leaf of one audit event: the whole event (``id``,
  ``occurred_at``, ``actor``, ``actor_role``, ``action``, ``target_type``, ``target_id``,
  ``remote_addr``, ``details``) plus, for events that issued certificates, each certificate's
  serial, SHA-256 and DER (base64): the log alone proves what was issued.
* :func:`gap_entry` builds the leaf that records audit ids that were allocated but never
  committed (a rolled-back transaction): the log then accounts for *every* id, so an auditor can
  check that nothing is missing.
* :func:`decode_entry` parses and checks a leaf; :func:`certificate_der` extracts certificates.

What it does not do: no hashing of trees, no database reads (the sequencer in
``services.ledger`` gathers events and certificates), no signatures.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ENTRY_VERSION = 1
KIND_EVENT = "audit_event"
KIND_GAP = "gap"


class EntryError(ValueError):
    """A leaf's bytes are not a valid log entry."""


@dataclass(frozen=True)
class CertificateRef:
    """One certificate an event issued, as it goes into the leaf."""

    serial_hex: str
    der: bytes

    @property
    def sha256_hex(self) -> str:
        return hashlib.sha256(self.der).hexdigest()

    def to_json(self) -> dict[str, str]:
        return {"serial": self.serial_hex, "sha256": self.sha256_hex,
                "der": base64.b64encode(self.der).decode("ascii")}


def _default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable in a log entry")


_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                            allow_nan=False, default=_default)


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, compact separators, UTF-8; refuses NaN and Infinity."""
    return _ENCODER.encode(obj).encode("utf-8")


def event_entry(event: Mapping[str, Any],
                certificates: Sequence[CertificateRef] = ()) -> dict[str, Any]:
    """The leaf object of one audit event (``event`` has the audit_events columns)."""
    occurred = event["occurred_at"]
    body: dict[str, Any] = {
        "v": ENTRY_VERSION,
        "kind": KIND_EVENT,
        "event": {
            "id": int(event["id"]),
            "occurred_at": occurred.isoformat() if isinstance(occurred, dt.datetime)
            else str(occurred),
            "actor": event["actor"],
            "actor_role": event["actor_role"],
            "action": event["action"],
            "target_type": event["target_type"],
            "target_id": event["target_id"],
            "remote_addr": event.get("remote_addr"),
            "details": event.get("details") or {},
        },
    }
    if certificates:
        body["certificates"] = [c.to_json() for c in
                                sorted(certificates, key=lambda c: c.serial_hex)]
    return body


def gap_entry(first_id: int, last_id: int) -> dict[str, Any]:
    """The leaf saying audit ids ``first_id..last_id`` were never committed."""
    if not 0 < first_id <= last_id:
        raise ValueError(f"bad gap {first_id}..{last_id}")
    return {"v": ENTRY_VERSION, "kind": KIND_GAP, "first_id": first_id, "last_id": last_id}


def decode_entry(data: bytes) -> dict[str, Any]:
    """Parse a leaf and check its shape (and that embedded certificates match their hashes)."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EntryError(f"leaf is not UTF-8 JSON: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != ENTRY_VERSION:
        raise EntryError("leaf is not a version-1 fleettrust log entry")
    kind = obj.get("kind")
    if kind == KIND_GAP:
        if not isinstance(obj.get("first_id"), int) or not isinstance(obj.get("last_id"), int):
            raise EntryError("gap leaf without first_id/last_id")
        return obj
    if kind != KIND_EVENT or not isinstance(obj.get("event"), dict):
        raise EntryError(f"unknown leaf kind {kind!r}")
    if not isinstance(obj["event"].get("id"), int):
        raise EntryError("event leaf without an integer event id")
    for cert in obj.get("certificates", []):
        der = certificate_der(cert)
        if hashlib.sha256(der).hexdigest() != cert.get("sha256"):
            raise EntryError(f"certificate {cert.get('serial')} in the leaf does not match its "
                             "SHA-256")
    return obj


def certificate_der(cert: Mapping[str, Any]) -> bytes:
    try:
        return base64.b64decode(str(cert["der"]), validate=True)
    except (KeyError, ValueError) as exc:
        raise EntryError("certificate in the leaf has no valid base64 DER") from exc


def entry_device_id(entry: Mapping[str, Any]) -> str | None:
    """The device a leaf is about, if any (target device, or ``details.device_id``)."""
    event = entry.get("event")
    if not isinstance(event, Mapping):
        return None
    if event.get("target_type") == "device" and isinstance(event.get("target_id"), str):
        return str(event["target_id"])
    details = event.get("details")
    if isinstance(details, Mapping) and isinstance(details.get("device_id"), str):
        return str(details["device_id"])
    return None
