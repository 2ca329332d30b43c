"""The referral job table (transactional outbox) as a SQLModel table.

A job is written in the same transaction as the Task change that calls for it, so a
referral is never stored without its delivery job, nor delivered without being stored.
Workers claim jobs with ``FOR UPDATE SKIP LOCKED`` and a lease (see worker.py).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

ACTIVE = ("pending", "leased", "paused")
"""Job states that still have work to do (``paused``: waiting for an operator to confirm a
partner's changed Endpoint address, ``carecoord partners confirm``)."""


class ReferralJob(SQLModel, table=True):
    """One unit of referral work: ``deliver`` a Task, ``track`` its partner copy, ``cancel`` it."""

    __tablename__ = "referral_job"
    __table_args__ = (
        sa.Index(
            "uq_referral_job_active",
            "kind",
            "task_id",
            unique=True,
            postgresql_where=sa.text("state IN ('pending', 'leased', 'paused')"),
        ),
        sa.Index("ix_referral_job_due", "not_before", postgresql_where=sa.text("state = 'pending'")),
        sa.Index("ix_referral_job_lease", "lease_until", postgresql_where=sa.text("state = 'leased'")),
        sa.Index("ix_referral_job_task", "task_id"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    kind: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    task_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    partner_org: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    partner_endpoint: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    state: str = Field(sa_column=sa.Column(sa.Text, nullable=False, server_default="pending"))
    attempts: int = Field(sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    not_before: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )
    lease_until: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    leased_by: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    deadline: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    partner_task: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    last_status: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    copies: int = Field(sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    """Copies of the partner's outputs this (tracking) job has stored (worker.MAX_COPIES)."""
    created_at: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )
    finished_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
