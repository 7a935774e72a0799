"""revocation: the revocation log (feed sequence) and published CRL state.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revocations",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("serial_hex", sa.String(48), nullable=False),
        sa.Column("ca_id", sa.String(40), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("operation_id", sa.String(40), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
    )
    op.create_index("ix_revocations_serial_hex", "revocations", ["serial_hex"])
    op.create_index("ix_revocations_operation_id", "revocations", ["operation_id"])
    op.create_index("ix_revocations_ca_seq", "revocations", ["ca_id", "seq"])
    op.create_table(
        "crl_state",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("ca_id", sa.String(40), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("crl_number", sa.BigInteger(), nullable=False),
        sa.Column("base_seq", sa.BigInteger(), nullable=False),
        sa.Column("this_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ca_id", "shard", name="uq_crl_state_ca_shard"),
    )
    # Batch / factory / breach-window revocation select by these.
    with op.batch_alter_table("certificates") as b:
        b.create_index("ix_certificates_ca_created", ["ca_id", "created_at"])


def downgrade() -> None:
    with op.batch_alter_table("certificates") as b:
        b.drop_index("ix_certificates_ca_created")
    op.drop_table("crl_state")
    op.drop_table("revocations")
