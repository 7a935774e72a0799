"""ledger: the transparency log (leaves, complete-subtree hashes, signed tree heads, log keys).

Leaves, nodes, tree heads and the certificate index are append-only: triggers refuse UPDATE and
DELETE on both backends, as for ``audit_events``.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

APPEND_ONLY = ("log_leaves", "log_nodes", "log_sths", "log_certificates")


def upgrade() -> None:
    op.create_table(
        "log_keys",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("key_id", sa.String(200), nullable=False),
        sa.Column("public_key_der", sa.LargeBinary(), nullable=False),
        sa.Column("log_id_hex", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("log_id_hex", name="uq_log_keys_log_id_hex"),
    )
    op.create_table(
        "log_leaves",
        sa.Column("leaf_index", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("audit_event_id", sa.BigInteger(), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=True),
        sa.Column("sequenced_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("leaf_index"),
        sa.UniqueConstraint("audit_event_id", name="uq_log_leaves_audit_event_id"),
    )
    op.create_index("ix_log_leaves_leaf_hash", "log_leaves", ["leaf_hash"])
    op.create_index("ix_log_leaves_device", "log_leaves", ["device_id", "leaf_index"])
    op.create_table(
        "log_nodes",
        # node_id = level * 2^48 + index (fleettrust.storage.ledger_models.node_id)
        sa.Column("node_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("node_id"),
    )
    op.create_table(
        "log_sths",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("timestamp_ms", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("key_id", sa.String(40), sa.ForeignKey("log_keys.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_log_sths_tree_size", "log_sths", ["tree_size"])
    op.create_table(
        "log_certificates",
        sa.Column("serial_hex", sa.String(48), nullable=False),
        sa.Column("leaf_index", sa.BigInteger(), nullable=False),
        sa.Column("cert_sha256", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("serial_hex"),
    )
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:
        if dialect == "sqlite":
            for verb in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )
        elif dialect == "postgresql":
            op.execute(
                f"CREATE FUNCTION {table}_append_only() RETURNS trigger AS $$ BEGIN "
                f"RAISE EXCEPTION '{table} is append-only'; END $$ LANGUAGE plpgsql"
            )
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                f"FOR EACH ROW EXECUTE FUNCTION {table}_append_only()"
            )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    for table in APPEND_ONLY:
        if dialect == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP FUNCTION IF EXISTS {table}_append_only()")
        # SQLite drops a table's triggers with the table.
    op.drop_table("log_certificates")
    op.drop_index("ix_log_sths_tree_size", "log_sths")
    op.drop_table("log_sths")
    op.drop_table("log_nodes")
    op.drop_index("ix_log_leaves_device", "log_leaves")
    op.drop_index("ix_log_leaves_leaf_hash", "log_leaves")
    op.drop_table("log_leaves")
    op.drop_table("log_keys")
