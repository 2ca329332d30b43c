"""search_position (``near``), search_worklist (sorted Task worklists), the reindex jobs

``Location?near=`` (R4 location.html#search) needs ``Location.position`` as numbers: one row
per position with latitude and longitude, indexed on (type, param, latitude, longitude) so a
bounding box is one index range scan before the exact great-circle check (no PostGIS, and the
embedded PostgreSQL has neither cube nor earthdistance).

A Task worklist (``Task?owner=X&status=...&_sort=-priority,authored-on``, or ``_sort=period``)
sorted by values spread over several index tables had to compute the sort keys of every match
(all of an owner's Tasks) before cutting a page: search_worklist holds one row per Task with its
owner and those sort values, indexed in the worklists' orders, so the page is an ordered index
range scan that stops when the page is full.

Locations and Tasks stored before this migration get their rows from the reindex job
(app/reindex.py), enqueued here, not from SQL written for one parameter.

Revision ID: 0020
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "search_position",
        sa.Column("rid", sa.BigInteger(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("param", sa.Text(), nullable=False),
        sa.Column("latitude", sa.Float(), nullable=False),
        sa.Column("longitude", sa.Float(), nullable=False),
    )
    op.create_index("ix_search_position_rid", "search_position", ["rid"], unique=False)
    op.create_index(
        "ix_search_position_lookup",
        "search_position",
        ["resource_type", "param", "latitude", "longitude"],
        unique=False,
        postgresql_include=["rid"],
    )
    op.create_table(
        "search_worklist",
        sa.Column("rid", sa.BigInteger(), nullable=False),
        sa.Column("resource_type", sa.Text(), nullable=False),
        sa.Column("param", sa.Text(), nullable=False),
        sa.Column("owner_type", sa.Text(), nullable=True),
        sa.Column("owner_id", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("authored_low", sa.DateTime(timezone=True), nullable=False),
        sa.Column("authored_high", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_low", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_high", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_search_worklist_rid", "search_worklist", ["rid"], unique=False)
    op.create_index(
        "ix_search_worklist_priority",
        "search_worklist",
        ["owner_id", "owner_type", "priority", sa.text("authored_low DESC"), sa.text("rid DESC")],
        unique=False,
        postgresql_include=["status"],
    )
    for name, column in (("authored", "authored_low"), ("period", "period_low"), ("due", "period_high")):
        op.create_index(
            f"ix_search_worklist_{name}",
            "search_worklist",
            ["owner_id", "owner_type", column, "rid"],
            unique=False,
            postgresql_include=["status"],
        )
    # The reindex jobs of the Locations and Tasks already stored (a no-op on an empty database).
    for resource_type in ("Location", "Task"):
        op.execute(
            f"INSERT INTO job (kind, key, payload) SELECT 'reindex', '{resource_type}',"
            f" '{{\"resource_type\": \"{resource_type}\", \"after\": 0, \"indexed\": 0}}'::jsonb"
            f" WHERE EXISTS (SELECT 1 FROM resource WHERE resource_type = '{resource_type}')"
            " ON CONFLICT DO NOTHING"
        )


def downgrade() -> None:
    for name in ("due", "period", "authored", "priority", "rid"):
        op.drop_index(f"ix_search_worklist_{name}", table_name="search_worklist")
    op.drop_table("search_worklist")
    op.drop_index("ix_search_position_lookup", table_name="search_position")
    op.drop_index("ix_search_position_rid", table_name="search_position")
    op.drop_table("search_position")
