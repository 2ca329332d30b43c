"""Tables of Bulk Data exports (revision 0015), for the migrations' review.

``bulk_export`` is one kick-off: who asked (the caller's access context, so the job exports
what that token may read), what was asked, the snapshot the export reads (taken at kick-off,
``transactionTime``), its state and progress (the checkpoint). ``bulk_export_file`` holds the
NDJSON: one row per chunk of a file (``part``) of one type; a file is its chunks in order. With
``CARECOORD_EXPORT_DIR`` the chunk's bytes are in that directory and ``body`` is NULL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel


class BulkExportRow(SQLModel, table=True):
    __tablename__ = "bulk_export"
    __table_args__ = (
        sa.Index("ix_bulk_export_client_id_state", "client_id", "state"),
        sa.Index("ix_bulk_export_expires_at", "expires_at"),
    )

    id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    client_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    access: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    level: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    request_url: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    parameters: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    transaction_time: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    snapshot: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    state: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    progress: dict[str, Any] = Field(sa_column=sa.Column(JSONB, nullable=False))
    resources_total: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, server_default="0"))
    error: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    created_at: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )
    completed_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))
    expires_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    polled_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True)))


class BulkExportFileRow(SQLModel, table=True):
    __tablename__ = "bulk_export_file"

    export_id: str = Field(
        sa_column=sa.Column(sa.Text, sa.ForeignKey("bulk_export.id", ondelete="CASCADE"), primary_key=True)
    )
    kind: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    resource_type: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    part: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    chunk: int = Field(sa_column=sa.Column(sa.Integer, primary_key=True))
    count: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    bytes: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    body: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
