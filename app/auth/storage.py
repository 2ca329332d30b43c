"""SQLModel tables of the authorization server: clients, signing keys, used assertion ids.

Created by migration 0007; registered on the same ``SQLModel.metadata`` as the resource
tables (and its naming convention) so that ``alembic check`` reviews them too.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from app.fhir import storage as _fhir_storage  # noqa: F401  (sets the metadata's naming convention first)


class OAuthClientRow(SQLModel, table=True):
    """A registered client (SMART Backend Services or a secret client).

    ``secret_hash`` is set for ``client_secret_basic``/``client_secret_post`` clients (scrypt,
    salted; the secret itself is never stored); ``jwks`` (a public JWK Set, JSON text) or
    ``jwks_url`` for ``private_key_jwt`` clients.
    """

    __tablename__ = "oauth_client"

    client_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    name: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    secret_hash: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    scopes: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    organization: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    patient: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    jwks: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    jwks_url: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    introspection: bool = Field(
        default=False,
        sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()),
        description="May introspect tokens issued to other clients (RFC 7662 section 4)",
    )
    created: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )


class AuthSigningKeyRow(SQLModel, table=True):
    """The server's access-token signing keys (private JWK JSON); the newest unretired one signs.

    A retired key stays (and stays published in the JWKS) until every token it signed has expired.
    """

    __tablename__ = "auth_signing_key"

    kid: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    private_jwk: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    created: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )
    retired_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )


class AuthJtiRow(SQLModel, table=True):
    """``jti`` values of client assertions already used (RFC 7523 §3 item 7: no replay)."""

    __tablename__ = "auth_jti"
    __table_args__ = (sa.Index("ix_auth_jti_expires_at", "expires_at"),)

    issuer: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    jti: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    expires_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
