"""revocation operations (the decided scope of each revocation) and published CRL documents.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "revocation_operations",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("target_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("batch_id", sa.String(40), nullable=True),
        sa.Column("factory_id", sa.String(40), nullable=True),
        sa.Column("ca_ids", sa.JSON(), nullable=False),
        sa.Column("leaf_ca_ids", sa.JSON(), nullable=False),
        sa.Column("issued_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("issued_before", sa.DateTime(timezone=True), nullable=True),
        sa.Column("covered", sa.BigInteger(), nullable=False),
        sa.Column("newly_revoked", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=True),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("done_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("id", name="uq_revocation_operations_id"),
    )
    op.create_index("ix_revocation_operations_state", "revocation_operations", ["state"])
    op.create_table(
        "crl_documents",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("ca_id", sa.String(40), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("crl_number", sa.BigInteger(), nullable=False),
        sa.Column("base_number", sa.BigInteger(), nullable=True),
        sa.Column("this_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_update", sa.DateTime(timezone=True), nullable=False),
        sa.Column("log_seq", sa.BigInteger(), nullable=False),
        sa.Column("op_seq", sa.BigInteger(), nullable=False),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("ca_id", "shard", "kind", name="uq_crl_documents_ca_shard_kind"),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Leave room in each page so revoking a certificate / device is a HOT update (no index
        # maintenance). Applies to pages written from now on (VACUUM FULL rewrites old ones).
        op.execute("ALTER TABLE certificates SET (fillfactor = 85)")
        op.execute("ALTER TABLE devices SET (fillfactor = 85)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE certificates RESET (fillfactor)")
        op.execute("ALTER TABLE devices RESET (fillfactor)")
    op.drop_table("crl_documents")
    op.drop_index("ix_revocation_operations_state", "revocation_operations")
    op.drop_table("revocation_operations")
