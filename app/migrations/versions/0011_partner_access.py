"""Partner access (issue 15): who wrote a resource, what a referral grants, bound credentials

* ``resource.created_org`` becomes ``resource.writer_org``: the organisation of the client that
  wrote the *current* version. A write by another principal takes a resource out of the
  first writer's organisation grant, so a partner cannot squat an id before its real owner
  writes it.
* ``search_reference`` rows with param ``_reference`` (every reference anywhere in a Task or
  ServiceRequest) are replaced by ``_grant`` rows: only the elements through which a referral
  gives its partner read access (Task.focus, Task.for, Task.requester; ServiceRequest.subject,
  requester, supportingInfo, reasonReference). A partner's ``Task.input`` pointing at another
  partner's Endpoint no longer makes that Endpoint readable, let alone writable. Only relative
  ``Type/id`` references are backfilled (absolute ones to this server need its base URL, which
  a migration does not know; they are indexed at the next write), as in 0010.
* ``partner_credentials.address``: the Endpoint address the credentials were set for. A
  partner's token is only ever sent to that address; when the Endpoint's address changes,
  delivery pauses until an operator confirms the new one (``carecoord partners confirm``).
  Existing credentials are bound to their Endpoint's current address.
* ``referral_job`` state ``paused`` (waiting for that confirmation) counts as active: at most one
  active job per kind and Task, as before.
* ``referral_job.copies``: how many copies of a partner's outputs a tracking job has stored (a
  partner naming ever new outputs must not fill the database).
* ``oauth_client.introspection``: clients registered to introspect tokens other than their own.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_GRANT_PATHS = {
    "Task": ("$.focus.reference", "$.for.reference", "$.requester.reference"),
    "ServiceRequest": (
        "$.subject.reference",
        "$.requester.reference",
        "$.supportingInfo[*].reference",
        "$.reasonReference[*].reference",
    ),
}


def upgrade() -> None:
    op.alter_column("resource", "created_org", new_column_name="writer_org")
    op.execute("ALTER INDEX ix_resource_created_org RENAME TO ix_resource_writer_org")

    op.execute("DELETE FROM search_reference WHERE param = '_reference'")
    for resource_type, paths in _GRANT_PATHS.items():
        for path in paths:
            op.execute(
                rf"""
                INSERT INTO search_reference (rid, resource_type, param, target_type, target_id)
                SELECT DISTINCT r.rid, r.resource_type, '_grant',
                       split_part(x.ref, '/', 1), split_part(x.ref, '/', 2)
                FROM resource r
                CROSS JOIN LATERAL jsonb_path_query(r.body::jsonb, 'lax {path}') AS j(value)
                CROSS JOIN LATERAL (SELECT j.value #>> '{{}}' AS ref) AS x
                WHERE r.resource_type = '{resource_type}'
                  AND NOT r.deleted
                  AND jsonb_typeof(j.value) = 'string'
                  AND x.ref ~ '^[A-Z][A-Za-z]{{1,63}}/[A-Za-z0-9.\-]{{1,64}}$'
                """
            )

    op.add_column("partner_credentials", sa.Column("address", sa.Text(), nullable=True))
    op.execute(
        """
        UPDATE partner_credentials c SET address = rtrim(r.body::jsonb ->> 'address', '/')
        FROM resource r
        WHERE r.resource_type = 'Endpoint' AND r.fhir_id = c.endpoint_id AND NOT r.deleted
        """
    )

    op.drop_index("uq_referral_job_active", table_name="referral_job")
    op.create_index(
        "uq_referral_job_active",
        "referral_job",
        ["kind", "task_id"],
        unique=True,
        postgresql_where=sa.text("state IN ('pending', 'leased', 'paused')"),
    )

    op.add_column(
        "referral_job", sa.Column("copies", sa.Integer(), server_default="0", nullable=False)
    )

    op.add_column(
        "oauth_client",
        sa.Column("introspection", sa.Boolean(), server_default=sa.false(), nullable=False),
    )


def downgrade() -> None:
    op.drop_column("oauth_client", "introspection")
    op.drop_column("referral_job", "copies")
    op.execute("UPDATE referral_job SET state = 'pending' WHERE state = 'paused'")
    op.drop_index("uq_referral_job_active", table_name="referral_job")
    op.create_index(
        "uq_referral_job_active",
        "referral_job",
        ["kind", "task_id"],
        unique=True,
        postgresql_where=sa.text("state IN ('pending', 'leased')"),
    )
    op.drop_column("partner_credentials", "address")
    op.execute("DELETE FROM search_reference WHERE param = '_grant'")
    op.execute("ALTER INDEX ix_resource_writer_org RENAME TO ix_resource_created_org")
    op.alter_column("resource", "writer_org", new_column_name="created_org")
