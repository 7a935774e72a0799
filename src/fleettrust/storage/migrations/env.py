"""Alembic environment: runs fleettrust's migrations against the connection it is handed."""

from __future__ import annotations

from alembic import context

from fleettrust.storage.models import Base

target_metadata = Base.metadata
connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - always called through fleettrust.storage.migrate
    raise RuntimeError("run migrations through `fleettrust db upgrade`")
context.configure(
    connection=connection,
    target_metadata=target_metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
