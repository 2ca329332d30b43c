"""subscription and subscription_event: FHIR Subscriptions (issue 10)

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subscription",
        sa.Column("fhir_id", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("filters", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("channel_type", sa.Text(), nullable=False),
        sa.Column("endpoint", sa.Text(), nullable=True),
        sa.Column("headers", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("heartbeat_seconds", sa.Integer(), nullable=True),
        sa.Column("timeout_seconds", sa.Integer(), nullable=False),
        sa.Column("max_count", sa.Integer(), nullable=False),
        sa.Column("end_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("owner_client", sa.Text(), nullable=True),
        sa.Column("owner_scope", sa.Text(), nullable=False),
        sa.Column("owner_organization", sa.Text(), nullable=True),
        sa.Column("owner_patient", sa.Text(), nullable=True),
        sa.Column("owner_unrestricted", sa.Boolean(), nullable=False),
        sa.Column("events_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("delivered_through", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("failures", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("last_sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("fhir_id", name="pk_subscription"),
    )
    op.create_index(
        "ix_subscription_topic", "subscription", ["topic"], postgresql_where=sa.text("status = 'active'")
    )
    op.create_table(
        "subscription_event",
        sa.Column("subscription_id", sa.Text(), nullable=False),
        sa.Column("event_number", sa.BigInteger(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("fhir_id", sa.Text(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(
            ["subscription_id"],
            ["subscription.fhir_id"],
            name="fk_subscription_event_subscription_id_subscription",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("subscription_id", "event_number", name="pk_subscription_event"),
    )
    op.create_index("ix_subscription_event_created_at", "subscription_event", ["created_at"])
    op.create_table(
        "subscription_generation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_subscription_generation"),
    )
    op.execute("INSERT INTO subscription_generation (id, generation) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("subscription_generation")
    op.drop_table("subscription_event")
    op.drop_index("ix_subscription_topic", table_name="subscription")
    op.drop_table("subscription")
