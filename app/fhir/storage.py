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
    __table_args__ = (sa.UniqueConstraint("resource_type", "fhir_id"),)

    rid: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    resource_type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    fhir_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    version_id: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    last_updated: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    deleted: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()))
    body: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))


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


class ServerKeyRow(SQLModel, table=True):
    """Server secrets (e.g. the key that signs paging cursors), created on first use."""

    __tablename__ = "server_key"

    name: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    secret: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
