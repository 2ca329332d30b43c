"""resource_change and change_cursor: the change feed (issue 10)

Every committed write of a resource records a change row in its own statement; consumers read
the feed in commit-order windows of transaction ids (app/events/changes.py). Writes made before
this revision have no change rows: the feed starts now.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "resource_change",
        sa.Column("seq", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column(
            "txid",
            sa.BigInteger(),
            server_default=sa.text("(pg_current_xact_id()::text)::bigint"),
            nullable=False,
        ),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("fhir_id", sa.Text(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("bookkeeping", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.PrimaryKeyConstraint("seq", name="pk_resource_change"),
    )
    op.create_index("ix_resource_change_txid", "resource_change", ["txid", "seq"])
    op.create_table(
        "change_cursor",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("lower", sa.BigInteger(), nullable=False),
        sa.Column("upper", sa.BigInteger(), nullable=False),
        sa.Column("after_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", name="pk_change_cursor"),
    )


def downgrade() -> None:
    op.drop_table("change_cursor")
    op.drop_index("ix_resource_change_txid", table_name="resource_change")
    op.drop_table("resource_change")
