"""covering search indexes

The lookup indexes of the search tables carry ``rid`` (and the columns a predicate
needs) so that a search reads the index alone (index-only scan) instead of one heap
page per matching row: at 1M resources the heap fetches were most of a query's time.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# name -> (table, key columns, included columns)
COVERING = {
    "ix_search_token_lookup": ("search_token", "resource_type, param, code, system", "rid"),
    "ix_search_string_prefix": ("search_string", "resource_type, param, value_norm text_pattern_ops", "rid"),
    "ix_search_date_low": ("search_date", "resource_type, param, low", "high, rid"),
    "ix_search_date_high": ("search_date", "resource_type, param, high", "low, rid"),
    "ix_search_reference_lookup": ("search_reference", "resource_type, param, target_id", "target_type, rid"),
    "ix_search_reference_target": ("search_reference", "target_id, target_type, param, resource_type", "rid"),
    "ix_search_quantity_lookup": (
        "search_quantity",
        "resource_type, param, value",
        "system, code, unit, rid",
    ),
    "ix_search_uri_lookup": ("search_uri", "resource_type, param, uri text_pattern_ops", "rid"),
}

PLAIN = {
    "ix_search_token_lookup": ("search_token", "resource_type, param, code, system"),
    "ix_search_string_prefix": ("search_string", "resource_type, param, value_norm text_pattern_ops"),
    "ix_search_date_low": ("search_date", "resource_type, param, low"),
    "ix_search_date_high": ("search_date", "resource_type, param, high"),
    "ix_search_reference_lookup": ("search_reference", "resource_type, param, target_id"),
    "ix_search_reference_target": ("search_reference", "target_id, target_type, param, resource_type"),
    "ix_search_quantity_lookup": ("search_quantity", "resource_type, param, value"),
    "ix_search_uri_lookup": ("search_uri", "resource_type, param, uri text_pattern_ops"),
}


def upgrade() -> None:
    for name, (table, columns, included) in COVERING.items():
        op.execute(f"DROP INDEX IF EXISTS {name}")
        op.execute(f"CREATE INDEX {name} ON {table} ({columns}) INCLUDE ({included})")
    # _lastUpdated conditions compare the column itself; the rid index serves the default order.
    op.execute("DROP INDEX IF EXISTS ix_resource_type_last_updated")
    op.execute(
        "CREATE INDEX ix_resource_type_last_updated ON resource (resource_type, last_updated) INCLUDE (rid)"
    )


def downgrade() -> None:
    for name, (table, columns) in PLAIN.items():
        op.execute(f"DROP INDEX IF EXISTS {name}")
        op.execute(f"CREATE INDEX {name} ON {table} ({columns})")
    op.execute("DROP INDEX IF EXISTS ix_resource_type_last_updated")
    op.execute("CREATE INDEX ix_resource_type_last_updated ON resource (resource_type, last_updated)")
