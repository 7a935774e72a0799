"""initial schema: hierarchy, factories, batches, devices, certificates, tokens, audit.

Audit events are append-only: triggers refuse UPDATE and DELETE on both backends.

Revision ID: 0001
Revises:
Create Date: 2026-11-24 14:10:48.248071
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("factory_id", sa.String(length=40), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("actor_role", sa.String(length=32), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=200), nullable=False),
        sa.Column("remote_addr", sa.String(length=64), nullable=True),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_events_action"), ["action"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_audit_events_occurred_at"), ["occurred_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_audit_events_target_id"), ["target_id"], unique=False)

    op.create_table(
        "cas",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("parent_id", sa.String(length=40), nullable=True),
        sa.Column("factory_id", sa.String(length=40), nullable=True),
        sa.Column("batch_id", sa.String(length=40), nullable=True),
        sa.Column("key_location", sa.String(length=16), nullable=False),
        sa.Column("key_id", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("path_length", sa.Integer(), nullable=True),
        sa.Column("certificate_der", sa.LargeBinary(), nullable=True),
        sa.Column("serial_hex", sa.String(length=48), nullable=True),
        sa.Column("subject_key_id", sa.String(length=64), nullable=True),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["cas.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("cas", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_cas_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_cas_factory_id"), ["factory_id"], unique=False)

    op.create_table(
        "certificates",
        sa.Column("serial_hex", sa.String(length=48), nullable=False),
        sa.Column("ca_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("subject_ca_id", sa.String(length=40), nullable=True),
        sa.Column("der", sa.LargeBinary(), nullable=False),
        sa.Column("public_key_sha256", sa.String(length=64), nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revocation_reason", sa.String(length=32), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("serial_hex"),
    )
    with op.batch_alter_table("certificates", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_certificates_ca_id"), ["ca_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_certificates_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_certificates_device_id"), ["device_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_certificates_public_key_sha256"), ["public_key_sha256"], unique=False
        )

    op.create_table(
        "claim_attempts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("subject", sa.String(length=200), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("claim_attempts", schema=None) as batch_op:
        batch_op.create_index(
            "ix_claim_attempt_subject_ts", ["subject", "attempted_at"], unique=False
        )

    op.create_table(
        "claim_codes",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("code_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_by", sa.String(length=200), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("code_sha256"),
    )
    with op.batch_alter_table("claim_codes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_claim_codes_device_id"), ["device_id"], unique=False)

    op.create_table(
        "device_nonces",
        sa.Column("nonce_sha256", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("nonce_sha256"),
    )
    with op.batch_alter_table("device_nonces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_nonces_device_id"), ["device_id"], unique=False)

    op.create_table(
        "device_sessions",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    with op.batch_alter_table("device_sessions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_device_sessions_device_id"), ["device_id"], unique=False
        )

    op.create_table(
        "findings",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("severity", sa.String(length=16), nullable=False),
        sa.Column("reason_code", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=True),
        sa.Column("evidence", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("findings", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_findings_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_findings_kind"), ["kind"], unique=False)

    op.create_table(
        "hardware_ids",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=80), nullable=False),
        sa.Column("value", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("hardware_ids", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_hardware_ids_device_id"), ["device_id"], unique=False)
        batch_op.create_index("ix_hwid_kind_value", ["kind", "value"], unique=False)

    op.create_table(
        "factories",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("ca_id", sa.String(length=40), nullable=False),
        sa.Column("batch_cas", sa.Boolean(), nullable=False),
        sa.Column("key_location", sa.String(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["ca_id"],
            ["cas.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("factory_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("product_model", sa.String(length=100), nullable=False),
        sa.Column("hardware_revision", sa.String(length=50), nullable=False),
        sa.Column("planned_size", sa.Integer(), nullable=False),
        sa.Column("issued_count", sa.Integer(), nullable=False),
        sa.Column("manufactured_on", sa.Date(), nullable=False),
        sa.Column("ca_id", sa.String(length=40), nullable=False),
        sa.Column("own_ca", sa.Boolean(), nullable=False),
        sa.Column("auth_method", sa.String(length=16), nullable=False),
        sa.Column("group_secret_enc", sa.LargeBinary(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["ca_id"],
            ["cas.id"],
        ),
        sa.ForeignKeyConstraint(
            ["factory_id"],
            ["factories.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("factory_id", "name", name="uq_batch_factory_name"),
    )
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_batches_factory_id"), ["factory_id"], unique=False)

    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("batch_id", sa.String(length=40), nullable=False),
        sa.Column("factory_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("auth_method", sa.String(length=16), nullable=False),
        sa.Column("key_origin", sa.String(length=16), nullable=False),
        sa.Column("weak_identity", sa.Boolean(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("manifest_sha256", sa.String(length=64), nullable=False),
        sa.Column("station", sa.String(length=100), nullable=True),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
        ),
        sa.ForeignKeyConstraint(
            ["factory_id"],
            ["factories.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_devices_batch_id"), ["batch_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_devices_factory_id"), ["factory_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_devices_owner"), ["owner"], unique=False)

    _append_only_audit()


def _append_only_audit() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for verb in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                "BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE FUNCTION audit_events_append_only() RETURNS trigger AS $$ BEGIN "
            "RAISE EXCEPTION 'audit_events is append-only'; END $$ LANGUAGE plpgsql"
        )
        op.execute(
            "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
            "FOR EACH ROW EXECUTE FUNCTION audit_events_append_only()"
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION IF EXISTS audit_events_append_only()")
    op.drop_table("devices")
    op.drop_table("batches")
    op.drop_table("factories")
    op.drop_table("hardware_ids")
    op.drop_table("findings")
    op.drop_table("device_sessions")
    op.drop_table("device_nonces")
    op.drop_table("claim_codes")
    op.drop_table("claim_attempts")
    op.drop_table("certificates")
    op.drop_table("cas")
    op.drop_table("audit_events")
    op.drop_table("api_tokens")
