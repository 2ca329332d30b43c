"""bulk_export, bulk_export_file, resource_history.txid: Bulk Data export (issue 12)

``resource_history.txid`` records the writing transaction of every version from now on, so an
export can read the versions current as of its kick-off snapshot (``pg_visible_in_snapshot``)
while writes go on. It is added without a default first (no table rewrite); rows written
before this revision keep NULL, which every later snapshot sees.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("resource_history", sa.Column("txid", sa.BigInteger(), nullable=True))
    op.alter_column(
        "resource_history", "txid", server_default=sa.text("(pg_current_xact_id()::text)::bigint")
    )
    op.create_table(
        "bulk_export",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=True),
        sa.Column("access", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("level", sa.Text(), nullable=False),
        sa.Column("request_url", sa.Text(), nullable=False),
        sa.Column("parameters", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("transaction_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("snapshot", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("progress", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("resources_total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("polled_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_bulk_export"),
    )
    op.create_index("ix_bulk_export_client_id_state", "bulk_export", ["client_id", "state"])
    op.create_index("ix_bulk_export_expires_at", "bulk_export", ["expires_at"])
    op.create_table(
        "bulk_export_file",
        sa.Column("export_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("chunk", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("body", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["export_id"],
            ["bulk_export.id"],
            name="fk_bulk_export_file_export_id_bulk_export",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "export_id", "kind", "resource_type", "part", "chunk", name="pk_bulk_export_file"
        ),
    )
    # Chunks are megabytes of JSON written once and read once: lz4 compresses them several times
    # faster than the default pglz. Servers built without lz4 keep pglz.
    op.execute(
        "DO $$ BEGIN ALTER TABLE bulk_export_file ALTER COLUMN body SET COMPRESSION lz4;"
        " EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN NULL; END $$"
    )


def downgrade() -> None:
    op.drop_table("bulk_export_file")
    op.drop_index("ix_bulk_export_expires_at", table_name="bulk_export")
    op.drop_index("ix_bulk_export_client_id_state", table_name="bulk_export")
    op.drop_table("bulk_export")
    op.drop_column("resource_history", "txid")
