"""SQLModel tables: the current version of each resource and every past version.

``body`` holds the resource JSON exactly as served (the client's JSON with the
server's ``id`` and ``meta.versionId``/``meta.lastUpdated`` set), so a read is one
indexed lookup that returns stored text: no model round trip, decimals as written.
The schema is created by the Alembic migrations in alembic/versions; ``metadata``
here is what they are reviewed against.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SQLModel.metadata.naming_convention = NAMING_CONVENTION


class ResourceRow(SQLModel, table=True):
    """The current version of a resource (deleted ones keep their row, ``deleted`` set)."""

    __tablename__ = "resource"
    __table_args__ = (
        sa.UniqueConstraint("resource_type", "fhir_id"),
        sa.Index(
            "ix_resource_writer_org",
            "writer_org",
            "resource_type",
            postgresql_where=sa.text("writer_org IS NOT NULL"),
        ),
    )

    rid: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    resource_type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    fhir_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    version_id: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    last_updated: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    deleted: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()))
    body: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    writer_org: str | None = Field(
        default=None,
        sa_column=sa.Column(sa.Text, nullable=True),
        description="Organization/ID of the partner client that wrote the current version"
        " (organisation access); NULL when another principal wrote it",
    )


class ResourceHistoryRow(SQLModel, table=True):
    """Every version ever written, including deletions (``method`` = DELETE, no body).

    ``hid`` orders the whole history; type and system history page on it (keyset).
    """

    __tablename__ = "resource_history"
    __table_args__ = (
        sa.UniqueConstraint("resource_type", "fhir_id", "version_id"),
        sa.Index("ix_resource_history_type_hid", "resource_type", "hid"),
    )

    hid: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    rid: int = Field(sa_column=sa.Column(sa.BigInteger, sa.ForeignKey("resource.rid"), nullable=False))
    resource_type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    fhir_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    version_id: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    last_updated: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    method: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    body: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    txid: int | None = Field(
        default=None,
        sa_column=sa.Column(
            sa.BigInteger, nullable=True, server_default=sa.text("(pg_current_xact_id()::text)::bigint")
        ),
        description="The writing transaction (Bulk Data export reads the versions a snapshot sees,"
        " app/exports); NULL for versions written before revision 0015",
    )


class ServerKeyRow(SQLModel, table=True):
    """Server secrets (e.g. the key that signs paging cursors), created on first use."""

    __tablename__ = "server_key"

    name: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    secret: str = Field(sa_column=sa.Column(sa.Text, nullable=False))


def _index_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("rid", sa.BigInteger, nullable=False, index=True),
        sa.Column("resource_type", sa.Text, nullable=False),
        sa.Column("param", sa.Text, nullable=False),
    ]


# Search index rows, one table per parameter type (R4 search.html#ptypes). Rows belong to
# the current version of a resource (``rid``); they are replaced on every write, in the
# same statement, and removed on delete.
search_token = sa.Table(
    "search_token",
    SQLModel.metadata,
    *_index_columns(),
    sa.Column("system", sa.Text),
    sa.Column("code", sa.Text),
    sa.Column("display", sa.Text),
    sa.Column("type_system", sa.Text),
    sa.Column("type_code", sa.Text),
    sa.Index(
        "ix_search_token_lookup", "resource_type", "param", "code", "rid", postgresql_include=["system"]
    ),
)
search_string = sa.Table(
    "search_string",
    SQLModel.metadata,
    *_index_columns(),
    sa.Column("value_norm", sa.Text, nullable=False),
    sa.Column("value_exact", sa.Text, nullable=False),
    sa.Index(
        "ix_search_string_prefix",
        "resource_type",
        "param",
        "value_norm",
        postgresql_ops={"value_norm": "text_pattern_ops"},
        postgresql_include=["rid"],
    ),
)
search_date = sa.Table(
    "search_date",
    SQLModel.metadata,
    *_index_columns(),
    sa.Column("low", sa.DateTime(timezone=True), nullable=False),
    sa.Column("high", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_search_date_low", "resource_type", "param", "low", postgresql_include=["high", "rid"]),
    sa.Index("ix_search_date_high", "resource_type", "param", "high", postgresql_include=["low", "rid"]),
)
search_reference = sa.Table(
    "search_reference",
    SQLModel.metadata,
    *_index_columns(),
    sa.Column("target_type", sa.Text),
    sa.Column("target_id", sa.Text),
    sa.Column("url", sa.Text),
    sa.Column("ident_system", sa.Text),
    sa.Column("ident_value", sa.Text),
    sa.Index(
        "ix_search_reference_target",
        "target_id",
        "target_type",
        "param",
        "resource_type",
        postgresql_include=["rid"],
    ),
    sa.Index(
        "ix_search_reference_lookup",
        "resource_type",
        "param",
        "target_id",
        "rid",
        postgresql_include=["target_type"],
    ),
    sa.Index("ix_search_reference_url", "resource_type", "param", "url"),
)
search_quantity = sa.Table(
    "search_quantity",
    SQLModel.metadata,
    *_index_columns(),
    sa.Column("value", sa.Numeric, nullable=False),
    sa.Column("system", sa.Text),
    sa.Column("code", sa.Text),
    sa.Column("unit", sa.Text),
    sa.Index(
        "ix_search_quantity_lookup",
        "resource_type",
        "param",
        "value",
        postgresql_include=["system", "code", "unit", "rid"],
    ),
)
search_uri = sa.Table(
    "search_uri",
    SQLModel.metadata,
    *_index_columns(),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Index(
        "ix_search_uri_lookup",
        "resource_type",
        "param",
        "uri",
        postgresql_ops={"uri": "text_pattern_ops"},
        postgresql_include=["rid"],
    ),
)
search_position = sa.Table(
    "search_position",
    SQLModel.metadata,
    *_index_columns(),
    sa.Column("latitude", sa.Float, nullable=False),
    sa.Column("longitude", sa.Float, nullable=False),
    # ``near`` (R4 Location.position): a latitude range (the bounding box) is one index range
    # scan; longitude is checked from the index too, before the exact great-circle distance.
    sa.Index(
        "ix_search_position_lookup",
        "resource_type",
        "param",
        "latitude",
        "longitude",
        postgresql_include=["rid"],
    ),
)
search_worklist = sa.Table(
    "search_worklist",
    SQLModel.metadata,
    *_index_columns(),
    sa.Column("owner_type", sa.Text),
    sa.Column("owner_id", sa.Text, nullable=False),
    sa.Column("status", sa.Text),
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("authored_low", sa.DateTime(timezone=True), nullable=False),
    sa.Column("authored_high", sa.DateTime(timezone=True), nullable=False),
    sa.Column("period_low", sa.DateTime(timezone=True), nullable=False),
    sa.Column("period_high", sa.DateTime(timezone=True), nullable=False),
    # A Task worklist (owner, sorted by priority and authored-on or by period) is one ordered
    # index range scan that stops at the page's end, however many Tasks the owner has
    # (app/fhir/search.py worklist_source). Scanned backwards, the first index serves
    # ``-priority,authored-on``; forwards, ``priority,-authored-on``.
    sa.Index(
        "ix_search_worklist_priority",
        "owner_id",
        "owner_type",
        "priority",
        sa.text("authored_low DESC"),
        sa.text("rid DESC"),
        postgresql_include=["status"],
    ),
    sa.Index(
        "ix_search_worklist_authored",
        "owner_id",
        "owner_type",
        "authored_low",
        "rid",
        postgresql_include=["status"],
    ),
    sa.Index(
        "ix_search_worklist_period",
        "owner_id",
        "owner_type",
        "period_low",
        "rid",
        postgresql_include=["status"],
    ),
    sa.Index(
        "ix_search_worklist_due",
        "owner_id",
        "owner_type",
        "period_high",
        "rid",
        postgresql_include=["status"],
    ),
)

# Declared for the migrations' review; created in 0002 (the trigram index only where pg_trgm exists).
sa.Index("ix_resource_type_rid", ResourceRow.__table__.c.resource_type, ResourceRow.__table__.c.rid)  # type: ignore[attr-defined]
sa.Index(
    "ix_resource_type_last_updated",
    ResourceRow.__table__.c.resource_type,  # type: ignore[attr-defined]
    ResourceRow.__table__.c.last_updated,  # type: ignore[attr-defined]
    postgresql_include=["rid", "deleted"],
)
