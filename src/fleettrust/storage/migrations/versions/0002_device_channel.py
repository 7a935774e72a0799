"""device channel: check-in state on devices, status change log, server credentials.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices") as b:
        b.add_column(sa.Column("status_reason", sa.String(200), nullable=True))
        b.add_column(sa.Column("last_remote_addr", sa.String(64), nullable=True))
        b.add_column(sa.Column("last_session", sa.String(64), nullable=True))
        b.add_column(sa.Column("firmware_version", sa.String(64), nullable=True))
        b.add_column(sa.Column("boot_counter", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("agent_generation", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("uptime_s", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("health", sa.JSON(), nullable=True))
        b.add_column(
            sa.Column("checkin_count", sa.BigInteger(), nullable=False, server_default="0")
        )
    op.create_table(
        "status_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("serial_hex", sa.String(48), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_status_changes_device_id", "status_changes", ["device_id"])
    op.create_table(
        "server_credentials",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(200), nullable=False),
        sa.Column("certificate_der", sa.LargeBinary(), nullable=False),
        sa.Column("names", sa.JSON(), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_server_credentials_purpose", "server_credentials", ["purpose"])


def downgrade() -> None:
    op.drop_table("server_credentials")
    op.drop_table("status_changes")
    with op.batch_alter_table("devices") as b:
        for col in ("checkin_count", "health", "uptime_s", "agent_generation", "boot_counter",
                    "firmware_version", "last_session", "last_remote_addr", "status_reason"):
            b.drop_column(col)
