"""HTTP side of the transparency log (``router``, mounted under ``/v1`` by ``create_app``).

Public reads (hashes and signatures only, like CT's ``get-sth`` / ``get-proof-by-hash``):

* ``GET /v1/log/sth[?tree_size=N]`` — the latest signed tree head (or the latest one signed at
  size ``N``): ``{"tree_size", "timestamp", "sha256_root_hash", "tree_head_signature",
  "log_id"}``.
* ``GET /v1/log/public-key`` — the log's ECDSA P-256 public key, PEM (``X-Log-Id`` header:
  base64 log id). This key is all ``fleettrust log verify`` needs.
* ``GET /v1/log/proof/inclusion?leaf_index=N|leaf_hash=H|serial=S[&tree_size=M]`` — ``{"leaf_index",
  "tree_size", "leaf_hash", "audit_path"}``; ``H`` in hex or base64; ``S`` a certificate serial
  (hex); ``M`` defaults to the latest STH's size.
* ``GET /v1/log/proof/consistency?first=M[&second=N]`` — ``{"first", "second", "consistency"}``.

Authenticated reads (leaves carry audit details: actors, addresses):

* ``GET /v1/log/entries?start=A&end=B`` — leaves ``A..B`` inclusive (≤ 1,000): ``leaf_index``,
  ``leaf_hash``, ``leaf_data`` (the exact bytes, base64) and ``entry`` (decoded). Admin, auditor.
* ``GET /v1/devices/{id}/history`` — every leaf about the device, oldest first, each with its
  inclusion proof against the returned STH; unsequenced events under ``pending``. Admin, auditor,
  the device's factory, its owner, repair centres.

Routes hold no queries: they call ``fleettrust.services.ledger``. This module does not run the
sequencer (the server starts it, see ``services.ledger.start_sequencer``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from fleettrust.api.deps import CtxDep, PrincipalDep
from fleettrust.api.schemas import IdPath
from fleettrust.errors import ValidationError
from fleettrust.ledger.sth import b64
from fleettrust.services import ledger

router = APIRouter(prefix="/v1")

SizeQuery = Annotated[int | None, Query(ge=0, le=2**62)]
_CACHE_NONE = {"Cache-Control": "no-store"}


def _parse_hash(value: str) -> bytes:
    v = value.strip()
    try:
        raw = bytes.fromhex(v) if len(v) == 64 else base64.b64decode(v, validate=True)
    except (ValueError, binascii.Error):
        raw = b""
    if len(raw) != 32:
        raise ValidationError("leaf_hash must be a SHA-256 hash in hex (64 characters) or "
                              "base64", code="bad_leaf_hash")
    return raw


@router.get("/log/sth", tags=["transparency log"])
def get_sth(ctx: CtxDep, response: Response, tree_size: SizeQuery = None) -> dict[str, Any]:
    response.headers.update(_CACHE_NONE)
    return ledger.latest_sth(ctx, tree_size).to_json()


@router.get("/log/public-key", tags=["transparency log"], response_class=Response)
def get_public_key(ctx: CtxDep) -> Response:
    pem, log_id = ledger.public_key_pem(ctx)
    return Response(pem, media_type="application/x-pem-file",
                    headers={"X-Log-Id": b64(log_id), "Cache-Control": "public, max-age=3600"})


@router.get("/log/proof/inclusion", tags=["transparency log"])
def get_inclusion_proof(
    ctx: CtxDep,
    leaf_index: Annotated[int | None, Query(ge=0, le=2**62)] = None,
    leaf_hash: Annotated[str | None, Query(max_length=100)] = None,
    serial: Annotated[str | None, Query(pattern=r"^[0-9a-fA-F]{1,48}$")] = None,
    tree_size: SizeQuery = None,
) -> dict[str, Any]:
    return ledger.inclusion_proof(
        ctx, leaf_index=leaf_index, leaf_hash=_parse_hash(leaf_hash) if leaf_hash else None,
        serial=serial, tree_size=tree_size).to_json()


@router.get("/log/proof/consistency", tags=["transparency log"])
def get_consistency_proof(
    ctx: CtxDep,
    first: Annotated[int, Query(ge=0, le=2**62)],
    second: SizeQuery = None,
) -> dict[str, Any]:
    return ledger.consistency_proof(ctx, first, second).to_json()


@router.get("/log/entries", tags=["transparency log"])
def get_entries(
    ctx: CtxDep, who: PrincipalDep,
    start: Annotated[int, Query(ge=0, le=2**62)],
    end: Annotated[int, Query(ge=0, le=2**62)],
) -> list[dict[str, Any]]:
    return ledger.get_entries(ctx, who, start, end)


@router.get("/devices/{device_id}/history", tags=["devices", "transparency log"])
def get_device_history(device_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return ledger.device_history(ctx, who, device_id)
