"""referral_job: the transactional outbox of referral delivery and status tracking

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "referral_job",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("task_id", sa.Text(), nullable=False),
        sa.Column("partner_org", sa.Text(), nullable=False),
        sa.Column("partner_endpoint", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("leased_by", sa.Text(), nullable=True),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=False),
        sa.Column("partner_task", sa.Text(), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_referral_job"),
    )
    op.create_index(
        "uq_referral_job_active",
        "referral_job",
        ["kind", "task_id"],
        unique=True,
        postgresql_where=sa.text("state IN ('pending', 'leased')"),
    )
    op.create_index(
        "ix_referral_job_due", "referral_job", ["not_before"], postgresql_where=sa.text("state = 'pending'")
    )
    op.create_index(
        "ix_referral_job_lease", "referral_job", ["lease_until"], postgresql_where=sa.text("state = 'leased'")
    )
    op.create_index("ix_referral_job_task", "referral_job", ["task_id"])


def downgrade() -> None:
    op.drop_table("referral_job")
