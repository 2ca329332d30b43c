"""extended statistics on the search tables

The columns of an index row are strongly correlated (``param = 'owner'`` implies
``resource_type = 'Task'`` and ``target_type = 'Organization'``); multiplying their
selectivities made the planner expect 11 rows where 2,444 matched at 1M resources, and
pick a plan that sorts every match. Functional-dependency and MCV statistics over the
(type, parameter, value) columns give it the real frequencies.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

STATISTICS = {
    "st_search_token": ("search_token", "resource_type, param, system, code"),
    "st_search_string": ("search_string", "resource_type, param, value_norm"),
    "st_search_date": ("search_date", "resource_type, param, low"),
    "st_search_reference": ("search_reference", "resource_type, param, target_type, target_id"),
    "st_search_quantity": ("search_quantity", "resource_type, param, system, code"),
    "st_search_uri": ("search_uri", "resource_type, param, uri"),
}


def upgrade() -> None:
    for name, (table, columns) in STATISTICS.items():
        op.execute(f"CREATE STATISTICS IF NOT EXISTS {name} (dependencies, mcv) ON {columns} FROM {table}")
        op.execute(f"ANALYZE {table}")


def downgrade() -> None:
    for name in STATISTICS:
        op.execute(f"DROP STATISTICS IF EXISTS {name}")
