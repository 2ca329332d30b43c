"""``referral_version``: the status of every version of every referral Task (migration 0021).

One row per version of a referral Task (``state_machine.is_referral``), written by
:class:`app.casework.referral_metrics.ReferralVersionHooks` in the write's own transaction
with the version's own ``last_updated`` (the ``resource_history`` row's), and backfilled from
``resource_history`` by the migration. It is the version history reduced to what
``Task/$referral-metrics`` reads: status changes over time and the due instant, without
parsing every version's JSON on every request (10,000 referrals: 30,000+ bodies).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from app.fhir.storage import ResourceRow


class ReferralVersionRow(SQLModel, table=True):
    __tablename__ = "referral_version"

    task_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    version_id: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    status: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    recorded: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False),
        description="last_updated of the version (resource_history)",
    )
    due: datetime | None = Field(
        default=None,
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True),
        description="End of restriction.period (the end of its implicit precision)",
    )


# Task rows by rid with what $referral-metrics reads of them (migration 0021): the Tasks an
# organisation sent or received are found from the search index by rid, and their current
# version and deletion are then read from this index alone (an index-only scan), not from the
# resource heap, where each row carries its body.
sa.Index(
    "ix_resource_task_version",
    ResourceRow.__table__.c.rid,  # type: ignore[attr-defined]
    postgresql_include=["version_id", "fhir_id", "deleted"],
    postgresql_where=sa.text("resource_type = 'Task'"),
)
