"""Reads that never wait for a writer: a compiled statement on the driver's cursor, outside any
SQLAlchemy transaction.

fleettrust's SQLite sessions begin with ``BEGIN IMMEDIATE`` (``storage.db``), so even a read-only
session queues behind a writer — for seconds while a large revocation's rows are written. A bare
``SELECT`` in WAL mode reads the last committed state at once. On PostgreSQL this is just a
cheaper read (no ORM row processing). Only for reads whose result may be one commit old.
"""

from __future__ import annotations

from typing import Any

from fleettrust.services.context import ServiceContext


def fetch(ctx: ServiceContext, stmt: Any, params: dict[str, Any] | None = None) -> list[Any]:
    """Rows of ``stmt`` (a SQLAlchemy Core select with ``bindparam`` placeholders)."""
    compiled = stmt.compile(dialect=ctx.engine.dialect)
    values = compiled.construct_params(params or {})
    order = compiled.positiontup
    args = tuple(values[n] for n in order) if order is not None else values
    with ctx.engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = dbapi.cursor()
        try:
            cursor.execute(str(compiled), args)
            rows: list[Any] = list(cursor.fetchall())
        finally:
            cursor.close()
        conn.rollback()
    return rows


__all__ = ["fetch"]
