"""Operator routes for the device registry state the gateway enforces (quarantine, decommission).

Certificate-level suspension (certificateHold) and revocation are in the revocation routes.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from fleettrust.api.deps import CtxDep, PrincipalDep
from fleettrust.services import gateway

router = APIRouter(prefix="/v1", tags=["devices"])


class StatusIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["active", "quarantined", "decommissioned"]
    reason: str | None = Field(None, max_length=200)


@router.post("/devices/{device_id}/status")
def set_status(device_id: str, body: StatusIn, ctx: CtxDep, who: PrincipalDep) -> dict[str, Any]:
    """Quarantine a device, release it (``active``) or decommission it (final)."""
    return gateway.set_device_status(ctx, who, device_id, body.status, body.reason)
