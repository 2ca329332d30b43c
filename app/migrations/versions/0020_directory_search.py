"""search_position (``near``) and the reindex job's first run

``Location?near=`` (R4 location.html#search) needs ``Location.position`` as numbers: one row
per position with latitude and longitude, indexed on (type, param, latitude, longitude) so a
bounding box is one index range scan before the exact great-circle check (no PostGIS, and the
embedded PostgreSQL has neither cube nor earthdistance).

Locations stored before this migration get their rows from the reindex job (app/reindex.py),
enqueued here, not from SQL written for one parameter.

Revision ID: 0020
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0014"
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
    # The reindex job of the Locations already stored (a no-op on an empty database).
    op.execute(
        "INSERT INTO job (kind, key, payload) SELECT 'reindex', 'Location',"
        " '{\"resource_type\": \"Location\", \"after\": 0}'::jsonb"
        " WHERE EXISTS (SELECT 1 FROM resource WHERE resource_type = 'Location')"
        " ON CONFLICT DO NOTHING"
    )


def downgrade() -> None:
    op.drop_index("ix_search_position_lookup", table_name="search_position")
    op.drop_index("ix_search_position_rid", table_name="search_position")
    op.drop_table("search_position")
