"""Operator routes of revocation: revoke a device, a batch, a factory (optionally a breach
window), suspend / release a device, preview counts, follow operations. Admin only (auditors
may preview and read operations); every route calls ``services.revocation``.

    POST /v1/revocation/devices/{device_id}            {"reason"}
    POST /v1/revocation/devices/{device_id}/suspend
    POST /v1/revocation/devices/{device_id}/release
    POST /v1/revocation/batches/{batch_id}             {"reason"}
    POST /v1/revocation/factories/{factory_id}         {"reason", "issued_after", "issued_before"}
    GET  /v1/revocation/preview?scope=&target_id=&issued_after=&issued_before=
    GET  /v1/revocation/operations[?limit=]
    GET  /v1/revocation/operations/{operation_id}

An answer is the operation's :class:`RevocationResult` plus ``state``: ``done`` when every
per-certificate row is written, ``pending`` while a large operation's rows are being written
(the revocation is in force either way).
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from fleettrust.api.deps import CtxDep, PrincipalDep
from fleettrust.api.schemas import ID_PATTERN, IdPath, Strict
from fleettrust.services import revocation as svc

router = APIRouter(prefix="/v1/revocation", tags=["revocation"])

Reason = Annotated[str, Field(max_length=40, description="RFC 5280 CRLReason name")]


class RevokeIn(Strict):
    reason: Reason = "unspecified"


class RevokeFactoryIn(Strict):
    reason: Reason = "unspecified"
    issued_after: dt.datetime | None = None
    issued_before: dt.datetime | None = None


def _view(result: svc.RevocationResult) -> dict[str, Any]:
    state = "done" if result.first_seq is not None or result.newly_revoked == 0 else "pending"
    return result.as_dict() | {"state": state}


@router.post("/devices/{device_id}")
async def revoke_device(device_id: IdPath, ctx: CtxDep, who: PrincipalDep,
                        body: RevokeIn | None = None) -> dict[str, Any]:
    reason = body.reason if body else "unspecified"
    return _view(await run_in_threadpool(svc.revoke_device, ctx, who, device_id, reason))


@router.post("/devices/{device_id}/suspend")
async def suspend_device(device_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return _view(await run_in_threadpool(svc.suspend_device, ctx, who, device_id))


@router.post("/devices/{device_id}/release")
async def release_device(device_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return _view(await run_in_threadpool(svc.release_device, ctx, who, device_id))


@router.post("/batches/{batch_id}")
async def revoke_batch(batch_id: IdPath, ctx: CtxDep, who: PrincipalDep,
                       body: RevokeIn | None = None) -> dict[str, Any]:
    reason = body.reason if body else "unspecified"
    return _view(await run_in_threadpool(svc.revoke_batch, ctx, who, batch_id, reason))


@router.post("/factories/{factory_id}")
async def revoke_factory(factory_id: IdPath, ctx: CtxDep, who: PrincipalDep,
                         body: RevokeFactoryIn | None = None) -> dict[str, Any]:
    b = body or RevokeFactoryIn()
    return _view(await run_in_threadpool(svc.revoke_factory, ctx, who, factory_id, b.reason,
                                         b.issued_after, b.issued_before))


@router.get("/preview")
async def preview(
    ctx: CtxDep, who: PrincipalDep,
    scope: Annotated[str, Query(max_length=16)],
    target_id: Annotated[str, Query(pattern=ID_PATTERN, max_length=64)],
    issued_after: dt.datetime | None = None,
    issued_before: dt.datetime | None = None,
) -> dict[str, Any]:
    return await run_in_threadpool(svc.preview, ctx, who, scope, target_id, issued_after,
                                   issued_before)


@router.get("/operations")
async def list_operations(ctx: CtxDep, who: PrincipalDep,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100
                          ) -> list[dict[str, Any]]:
    return await run_in_threadpool(svc.list_operations, ctx, who, limit)


@router.get("/operations/{operation_id}")
async def operation(operation_id: IdPath, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    return await run_in_threadpool(svc.operation_status, ctx, who, operation_id)
