"""SQLModel table of the partner credentials carecoord uses to deliver referrals.

Created by migration 0008; registered on the same ``SQLModel.metadata`` as the resource
tables (and its naming convention) so that ``alembic check`` reviews it too.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from app.fhir import storage as _fhir_storage  # noqa: F401  (sets the metadata's naming convention first)


class PartnerCredentialsRow(SQLModel, table=True):
    """How carecoord authenticates to one partner's FHIR server (keyed by the local Endpoint id).

    ``auth_method`` is ``client_secret`` (RFC 6749 §4.4 with ``client_secret_basic``, §2.3.1) or
    ``private_key_jwt`` (SMART Backend Services, RFC 7523 §2.2). The secret and the private key
    are stored Fernet-encrypted (app/referrals/credentials.py), never in clear.
    """

    __tablename__ = "partner_credentials"
    __table_args__ = (
        sa.CheckConstraint("auth_method IN ('client_secret', 'private_key_jwt')", name="auth_method"),
        sa.CheckConstraint("alg IS NULL OR alg IN ('ES384', 'RS384')", name="alg"),
    )

    endpoint_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    token_url: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    client_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    auth_method: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    secret_encrypted: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    private_key_encrypted: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    kid: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    alg: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    address: str | None = Field(
        default=None,
        sa_column=sa.Column(sa.Text, nullable=True),
        description="The Endpoint address these credentials were confirmed for (tokens go nowhere else)",
    )
    updated: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )
