"""Audit events: one self-contained row per state-changing operation (or per device in bulk).

Events are written in the caller's transaction, so an operation and its audit record commit or
roll back together. Rows are never updated or deleted (database triggers enforce it). Each event
carries everything needed to read it alone: actor, role, action, target and details.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from fleettrust.services.auth import Principal
from fleettrust.storage.models import AuditEvent


def record(
    session: Session,
    principal: Principal,
    action: str,
    target_type: str,
    target_id: str,
    now: dt.datetime,
    **details: Any,
) -> None:
    session.add(
        AuditEvent(
            occurred_at=now,
            actor=principal.actor,
            actor_role=principal.role,
            action=action,
            target_type=target_type,
            target_id=target_id,
            remote_addr=principal.remote_addr,
            details=details,
        )
    )


def record_many(
    session: Session,
    principal: Principal,
    action: str,
    target_type: str,
    now: dt.datetime,
    items: Iterable[tuple[str, dict[str, Any]]],
) -> None:
    """Bulk variant: one event per (target_id, details) pair, inserted in one statement."""
    rows = [
        {
            "occurred_at": now,
            "actor": principal.actor,
            "actor_role": principal.role,
            "action": action,
            "target_type": target_type,
            "target_id": target_id,
            "remote_addr": principal.remote_addr,
            "details": details,
        }
        for target_id, details in items
    ]
    if rows:
        session.execute(insert(AuditEvent), rows)
