"""The ``job`` table as a SQLModel table (the schema Alembic checks against, migration 0013).

A job is a unit of background work of some ``kind`` with a JSON ``payload``. It is written in
the transaction of the change that calls for it (a transactional outbox), so the change is
never stored without its job, nor its job run without the change. Every statement that reads
or writes this table is in app/jobs/queue.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlmodel import Field, SQLModel

ACTIVE_STATES = ("pending", "leased", "paused")
"""States with work still to do (``paused``: waiting for something outside the queue, e.g. an
operator confirming a partner's changed address). At most one active job per (kind, key)."""
STATES = (*ACTIVE_STATES, "done", "failed")


class Job(SQLModel, table=True):
    """One unit of background work (see app/jobs/runner.py for how it is run)."""

    __tablename__ = "job"
    __table_args__ = (
        sa.Index(
            "uq_job_active",
            "kind",
            "key",
            unique=True,
            postgresql_where=sa.text("state IN ('pending', 'leased', 'paused')"),
        ),
        sa.Index("ix_job_due", "kind", "not_before", postgresql_where=sa.text("state = 'pending'")),
        sa.Index("ix_job_lease", "lease_until", postgresql_where=sa.text("state = 'leased'")),
        sa.Index("ix_job_key", "key"),
    )

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    kind: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    key: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    payload: dict[str, Any] = Field(
        sa_column=sa.Column(postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb"))
    )
    state: str = Field(sa_column=sa.Column(sa.Text, nullable=False, server_default="pending"))
    attempts: int = Field(sa_column=sa.Column(sa.Integer, nullable=False, server_default="0"))
    not_before: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )
    lease_until: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    leased_by: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    deadline: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    last_status: int | None = Field(default=None, sa_column=sa.Column(sa.Integer))
    last_error: str | None = Field(default=None, sa_column=sa.Column(sa.Text))
    created_at: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )
    finished_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
