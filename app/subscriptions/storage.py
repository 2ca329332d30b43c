"""SQLModel tables of subscriptions (created by migration 0014; reviewed against these).

``subscription`` is the working state of each Subscription resource: what it asked for, parsed
once (topic, filters, channel), whose it is (the access its notifications are judged with), and
its counters. It is written by the Subscription write hook in the same transaction as the
resource, so the two never disagree. ``subscription_event`` holds each subscription's events,
numbered from 1 without gaps in the order the change feed gives them, kept for
CARECOORD_SUBSCRIPTION_EVENT_RETENTION seconds so that ``$events`` can replay them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel


class SubscriptionRow(SQLModel, table=True):
    __tablename__ = "subscription"
    __table_args__ = (
        sa.Index("ix_subscription_topic", "topic", postgresql_where=sa.text("status = 'active'")),
    )

    fhir_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    topic: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    filters: list[dict[str, Any]] = Field(sa_column=sa.Column(JSONB, nullable=False))
    channel_type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    endpoint: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    headers: list[str] = Field(sa_column=sa.Column(JSONB, nullable=False))
    content: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    """``empty``, ``id-only`` or ``full-resource``."""
    heartbeat_seconds: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    timeout_seconds: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    max_count: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    end_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    status: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    """``requested`` (handshake pending), ``active``, ``error`` or ``off`` (R4 subscription-status)."""
    owner_client: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    owner_scope: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    owner_organization: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    owner_patient: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    owner_user: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    """The person of the owner's token (``fhirUser``): notifications carry only what they see."""
    owner_unrestricted: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False))
    """Created with authorization off (local development): notifications are not filtered."""
    events_count: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, server_default="0"))
    """The number of the last event (R4 backport ``events-since-subscription-start``)."""
    delivered_through: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, server_default="0"))
    """Every event up to this number was delivered (acknowledged by the endpoint)."""
    failures: int = Field(sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    """Consecutive failed delivery attempts."""
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_sent_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    created_at: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )


class SubscriptionEventRow(SQLModel, table=True):
    __tablename__ = "subscription_event"
    __table_args__ = (sa.Index("ix_subscription_event_created_at", "created_at"),)

    subscription_id: str = Field(
        sa_column=sa.Column(
            sa.Text, sa.ForeignKey("subscription.fhir_id", ondelete="CASCADE"), primary_key=True
        )
    )
    event_number: int = Field(sa_column=sa.Column(sa.BigInteger, primary_key=True))
    resource_type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    fhir_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    version_id: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    action: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    occurred_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    """When the change was written (the notification-event ``timestamp``)."""
    created_at: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )


class SubscriptionGenerationRow(SQLModel, table=True):
    """One row: a number every write of a Subscription (and every status change) raises in its
    transaction, so the dispatcher knows when the subscriptions it keeps in memory changed."""

    __tablename__ = "subscription_generation"

    id: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    generation: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, server_default="0"))
