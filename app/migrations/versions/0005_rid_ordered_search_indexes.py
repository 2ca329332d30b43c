"""rid-ordered search indexes

A page of the default order is cut from the index rows (the first n+1 rids of the
matches). With ``rid`` as the last key column, the rows of one value (one owner, one
status) come out of the index already in rid order, so PostgreSQL stops after n+1 of them
instead of sorting every match; ``deleted`` in the last-updated index lets ``_lastUpdated``
be answered from the index alone.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-25
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

NEW = {
    "ix_search_token_lookup": ("search_token", "resource_type, param, code, rid", "system"),
    "ix_search_reference_lookup": ("search_reference", "resource_type, param, target_id, rid", "target_type"),
    "ix_resource_type_last_updated": ("resource", "resource_type, last_updated", "rid, deleted"),
}
OLD = {
    "ix_search_token_lookup": ("search_token", "resource_type, param, code, system", "rid"),
    "ix_search_reference_lookup": ("search_reference", "resource_type, param, target_id", "target_type, rid"),
    "ix_resource_type_last_updated": ("resource", "resource_type, last_updated", "rid"),
}


def _build(indexes: dict[str, tuple[str, str, str]]) -> None:
    for name, (table, columns, included) in indexes.items():
        op.execute(f"DROP INDEX IF EXISTS {name}")
        op.execute(f"CREATE INDEX {name} ON {table} ({columns}) INCLUDE ({included})")


def upgrade() -> None:
    _build(NEW)


def downgrade() -> None:
    _build(OLD)
