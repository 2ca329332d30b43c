"""SQLModel tables of the change feed (created by migration 0012; reviewed against these).

``resource_change`` gets one row per committed write of a resource (create, update, PATCH,
delete; every entry of a batch or transaction; the workers' writes), inserted by the same
statement that writes the version (app/fhir/repository.py), so a change is recorded exactly
when its write commits. ``change_cursor`` is each consumer's position in the feed
(app/events/changes.py explains the commit-order window).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

CURRENT_XID = sa.text("(pg_current_xact_id()::text)::bigint")
"""The writing transaction's id (xid8 as bigint): what the feed's commit-order window reads."""


class ResourceChangeRow(SQLModel, table=True):
    """One committed write of one resource version."""

    __tablename__ = "resource_change"
    __table_args__ = (sa.Index("ix_resource_change_txid", "txid", "seq"),)

    seq: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    txid: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, server_default=CURRENT_XID))
    resource_type: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    fhir_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    version_id: int = Field(sa_column=sa.Column(sa.Integer, nullable=False))
    action: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    """``create``, ``update`` or ``delete`` (R4 Subscriptions Backport: the interaction)."""
    changed_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    bookkeeping: bool = Field(sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()))
    """carecoord's own record-keeping (a referral's delivery state on its Task): never an event."""


class ChangeCursorRow(SQLModel, table=True):
    """Where a consumer of the feed stands: the window of transaction ids it is working through
    (``lower`` inclusive, ``upper`` exclusive) and the last ``seq`` it finished inside it."""

    __tablename__ = "change_cursor"

    consumer: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    lower: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    upper: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False))
    after_seq: int = Field(sa_column=sa.Column(sa.BigInteger, nullable=False, server_default="0"))
    updated_at: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )
