"""referral_version: the status of each version of each referral Task, and ix_resource_task_version
($referral-metrics)

Revision ID: 0021
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

# The versions of referral Tasks (intent order, code task-code#fulfill, focus a ServiceRequest)
# already stored; restriction.period.end as the end of its implicit precision, in UTC.
_BACKFILL = r"""
INSERT INTO referral_version (task_id, version_id, status, recorded, due)
SELECT h.fhir_id, h.version_id, j.b ->> 'status', h.last_updated,
       CASE
           WHEN d LIKE '____-__-__T%' THEN (CASE
               WHEN d ~ '(Z|[+-][0-9]{2}:[0-9]{2})$' THEN d ELSE d || 'Z' END)::timestamptz
           WHEN length(d) = 10 THEN (d || 'T00:00:00Z')::timestamptz + interval '1 day'
           WHEN length(d) = 7 THEN (d || '-01T00:00:00Z')::timestamptz + interval '1 month'
           WHEN length(d) = 4 THEN (d || '-01-01T00:00:00Z')::timestamptz + interval '1 year'
       END
FROM resource_history h
CROSS JOIN LATERAL (SELECT h.body::jsonb AS b) j
CROSS JOIN LATERAL (SELECT j.b #>> '{restriction,period,end}' AS d) e
WHERE h.resource_type = 'Task' AND h.body IS NOT NULL
  AND j.b ->> 'intent' = 'order'
  AND j.b -> 'focus' ->> 'reference' LIKE '%ServiceRequest/%'
  AND j.b ->> 'status' IS NOT NULL
  AND EXISTS (
      SELECT 1 FROM jsonb_array_elements(
          CASE WHEN jsonb_typeof(j.b -> 'code' -> 'coding') = 'array' THEN j.b -> 'code' -> 'coding'
               ELSE '[]'::jsonb END) c
      WHERE c ->> 'system' = 'http://hl7.org/fhir/CodeSystem/task-code' AND c ->> 'code' = 'fulfill')
ON CONFLICT DO NOTHING
"""


def upgrade() -> None:
    op.create_table(
        "referral_version",
        sa.Column("task_id", sa.Text(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("recorded", sa.DateTime(timezone=True), nullable=False),
        sa.Column("due", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("task_id", "version_id", name=op.f("pk_referral_version")),
    )
    op.execute(_BACKFILL)
    op.create_index(
        "ix_resource_task_version",
        "resource",
        ["rid"],
        postgresql_include=["version_id", "fhir_id", "deleted"],
        postgresql_where=sa.text("resource_type = 'Task'"),
    )


def downgrade() -> None:
    op.drop_index("ix_resource_task_version", table_name="resource")
    op.drop_table("referral_version")
