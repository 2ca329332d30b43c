"""resource.created_org: the organisation whose client created a resource

A client registered for a partner organisation sees what it created itself (issue 4,
organisation access); the creating organisation is kept on the current row so that the
condition is part of the same SQL as every read and search.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("resource", sa.Column("created_org", sa.Text(), nullable=True))
    op.create_index(
        "ix_resource_created_org",
        "resource",
        ["created_org", "resource_type"],
        postgresql_where=sa.text("created_org IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_resource_created_org", table_name="resource")
    op.drop_column("resource", "created_org")
