"""job: one generic job table (issue 10) replaces referral_job

The job runner (app/jobs) runs jobs of any kind with a JSON payload. Referral delivery,
tracking and cancellation become its kinds ``referral.deliver``, ``referral.track`` and
``referral.cancel``, keyed by the Task id, with the payload ``{task_id, partner_org,
partner_endpoint, partner_task, copies}``. Every ``referral_job`` row moves to ``job`` (finished
ones too: ``carecoord referrals status`` and cancellations read them), ids, attempts, leases and
outcomes unchanged, and ``referral_job`` is dropped.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_ACTIVE = "state IN ('pending', 'leased', 'paused')"


def upgrade() -> None:
    op.create_table(
        "job",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("payload", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("state", sa.Text(), server_default="pending", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("not_before", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("leased_by", sa.Text(), nullable=True),
        sa.Column("deadline", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_job"),
    )
    op.create_index("uq_job_active", "job", ["kind", "key"], unique=True, postgresql_where=sa.text(_ACTIVE))
    op.create_index("ix_job_due", "job", ["kind", "not_before"], postgresql_where=sa.text("state = 'pending'"))
    op.create_index("ix_job_lease", "job", ["lease_until"], postgresql_where=sa.text("state = 'leased'"))
    op.create_index("ix_job_key", "job", ["key"])
    op.execute(
        """
        INSERT INTO job (id, kind, key, payload, state, attempts, not_before, lease_until, leased_by,
                         deadline, last_status, last_error, created_at, finished_at)
        OVERRIDING SYSTEM VALUE
        SELECT id, 'referral.' || kind, task_id,
               jsonb_build_object('task_id', task_id, 'partner_org', partner_org,
                                  'partner_endpoint', partner_endpoint, 'partner_task', partner_task,
                                  'copies', copies),
               state, attempts, not_before, lease_until, leased_by, deadline, last_status, last_error,
               created_at, finished_at
        FROM referral_job ORDER BY id
        """
    )
    op.execute("SELECT setval(pg_get_serial_sequence('job', 'id'), COALESCE((SELECT max(id) FROM job), 0) + 1, false)")
    op.drop_table("referral_job")


def downgrade() -> None:
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
        sa.Column("copies", sa.Integer(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_referral_job"),
    )
    op.create_index(
        "uq_referral_job_active", "referral_job", ["kind", "task_id"], unique=True,
        postgresql_where=sa.text(_ACTIVE),
    )
    op.create_index(
        "ix_referral_job_due", "referral_job", ["not_before"], postgresql_where=sa.text("state = 'pending'")
    )
    op.create_index(
        "ix_referral_job_lease", "referral_job", ["lease_until"], postgresql_where=sa.text("state = 'leased'")
    )
    op.create_index("ix_referral_job_task", "referral_job", ["task_id"])
    op.execute(
        """
        INSERT INTO referral_job (id, kind, task_id, partner_org, partner_endpoint, state, attempts,
                                  not_before, lease_until, leased_by, deadline, partner_task,
                                  last_status, last_error, created_at, finished_at, copies)
        OVERRIDING SYSTEM VALUE
        SELECT id, substr(kind, length('referral.') + 1), key, payload ->> 'partner_org',
               payload ->> 'partner_endpoint', state, attempts, not_before, lease_until, leased_by,
               COALESCE(deadline, now()), payload ->> 'partner_task', last_status, last_error,
               created_at, finished_at, COALESCE((payload ->> 'copies')::int, 0)
        FROM job WHERE kind LIKE 'referral.%' ORDER BY id
        """
    )
    op.execute(
        "SELECT setval(pg_get_serial_sequence('referral_job', 'id'),"
        " COALESCE((SELECT max(id) FROM referral_job), 0) + 1, false)"
    )
    op.drop_table("job")
