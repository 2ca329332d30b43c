"""finer planner statistics on the reference and token index tables

Revision 0004's statistics over (type, parameter, value) missed two frequencies a chained
directory search depends on (``HealthcareService?service-category=C&location.near=...``, issue
13): the reference statistics include ``target_id``, which is nearly unique, so their MCV list
holds no (type, parameter) pair and the planner took 25,000 ``HealthcareService.location``
rows for 1; and 100 MCV entries of (type, parameter, system, code) do not reach a service
category's 2,500 rows among 2.6 million token rows at 1M resources. Each misestimate sent the
plan through every candidate row (150 to 175 ms); with both statistics the search starts from
the few Locations near the point (1 ms). Measured with bench/directory.py (--keep-db) and
EXPLAIN ANALYZE.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

TOKEN_STATISTICS_TARGET = 500
"""MCV entries kept for (type, parameter, system, code): ANALYZE samples 300 x this many rows
(5 s at 2.6 million token rows on two cores, run by autovacuum in the background)."""


def upgrade() -> None:
    op.execute(
        "CREATE STATISTICS IF NOT EXISTS st_search_reference_kind (dependencies, mcv)"
        " ON resource_type, param, target_type FROM search_reference"
    )
    op.execute(f"ALTER STATISTICS st_search_token SET STATISTICS {TOKEN_STATISTICS_TARGET}")
    op.execute("ANALYZE search_reference")
    op.execute("ANALYZE search_token")


def downgrade() -> None:
    op.execute("ALTER STATISTICS st_search_token SET STATISTICS -1")
    op.execute("DROP STATISTICS IF EXISTS st_search_reference_kind")
