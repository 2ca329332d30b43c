"""Backfill the ``_reference`` index rows of existing Tasks and ServiceRequests

Partner organisations see what their referrals point to (issue 4); that is answered from
``search_reference`` rows with param ``_reference``, one for every local reference anywhere in
a Task or ServiceRequest, written with every write since revision 0006. Referrals stored
before then get theirs here, so that a partner sees the same whether its referral was written
before or after the upgrade. Only relative ``Type/id`` references are taken (absolute
references to this server need its base URL, which a migration does not know; they are
indexed at the next write).

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        r"""
        INSERT INTO search_reference (rid, resource_type, param, target_type, target_id)
        SELECT DISTINCT r.rid, r.resource_type, '_reference',
               split_part(x.ref, '/', 1), split_part(x.ref, '/', 2)
        FROM resource r
        CROSS JOIN LATERAL jsonb_path_query(r.body::jsonb, 'lax $.**.reference') AS j(value)
        CROSS JOIN LATERAL (SELECT j.value #>> '{}' AS ref) AS x
        WHERE r.resource_type IN ('Task', 'ServiceRequest')
          AND NOT r.deleted
          AND jsonb_typeof(j.value) = 'string'
          AND x.ref ~ '^[A-Z][A-Za-z]{1,63}/[A-Za-z0-9.\-]{1,64}$'
          AND NOT EXISTS (
              SELECT 1 FROM search_reference s
              WHERE s.rid = r.rid AND s.param = '_reference'
          )
        """
    )


def downgrade() -> None:
    # The rows are what every write since 0006 produces anyway; nothing to undo.
    pass
