"""SQLModel tables of the authorization server: clients, signing keys, used assertion ids.

Created by migration 0007; registered on the same ``SQLModel.metadata`` as the resource
tables (and its naming convention) so that ``alembic check`` reviews them too.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
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
    redirect_uris: list[str] = Field(
        default_factory=list,
        sa_column=sa.Column(
            postgresql.ARRAY(sa.Text), nullable=False, server_default=sa.text("'{}'::text[]")
        ),
        description="Exact redirect URIs of an app client (SMART App Launch, RFC 6749 section 3.1.2)",
    )
    public: bool = Field(
        default=False,
        sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false()),
        description="A public app client: no secret, PKCE S256 required (RFC 7636)",
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


class AppUserRow(SQLModel, table=True):
    """A person who signs in at /auth/authorize (SMART App Launch): ``fhir_user`` is the FHIR
    resource they are (``Practitioner/ID``, ``Patient/ID`` or ``RelatedPerson/ID``)."""

    __tablename__ = "app_user"
    __table_args__ = (sa.UniqueConstraint("username", name="uq_app_user_username"),)

    user_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    username: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    fhir_user: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    password_hash: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    disabled: bool = Field(
        default=False, sa_column=sa.Column(sa.Boolean, nullable=False, server_default=sa.false())
    )
    created: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )


class AuthLoginFailureRow(SQLModel, table=True):
    """One failed sign-in, once per key it counts against (``user:NAME``, ``address:A``)."""

    __tablename__ = "auth_login_failure"
    __table_args__ = (sa.Index("ix_auth_login_failure_key_at", "key", "at"),)

    id: int | None = Field(default=None, sa_column=sa.Column(sa.BigInteger, sa.Identity(), primary_key=True))
    key: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    at: datetime = Field(
        sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now())
    )


class AuthRequestFailureRow(SQLModel, table=True):
    """The recent failed /auth/token, /auth/revoke and /auth/introspect requests of one key
    (``address:A``, ``client:C@A``): at most the limit's worth of stamps, and the newest
    (migration 0023; app/auth/ratelimit.py)."""

    __tablename__ = "auth_request_failure"
    __table_args__ = (sa.Index("ix_auth_request_failure_last_at", "last_at"),)

    key: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    stamps: list[datetime] = Field(
        sa_column=sa.Column(postgresql.ARRAY(sa.DateTime(timezone=True)), nullable=False)
    )
    last_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))


class AuthFlowRow(SQLModel, table=True):
    """An authorization request between its pages (login, patient, consent)."""

    __tablename__ = "auth_flow"
    __table_args__ = (sa.Index("ix_auth_flow_expires_at", "expires_at"),)

    flow_id: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    browser_hash: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    csrf_token: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    client_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    redirect_uri: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    scope: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    state: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    nonce: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    code_challenge: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    step: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    user_id: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    patient: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    upstream: str | None = Field(
        default=None,
        sa_column=sa.Column(sa.Text, nullable=True),
        description="JSON: state, nonce and PKCE verifier of a sign-in at the upstream OpenID provider",
    )
    expires_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))


class AuthCodeRow(SQLModel, table=True):
    """A one-time authorization code (stored hashed), bound to client, redirect URI and PKCE."""

    __tablename__ = "auth_code"
    __table_args__ = (sa.Index("ix_auth_code_expires_at", "expires_at"),)

    code_hash: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    client_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    redirect_uri: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    code_challenge: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    scope: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    user_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    patient: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    nonce: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    family: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    expires_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    used_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )


class AuthRefreshTokenRow(SQLModel, table=True):
    """A refresh token (stored hashed); each use rotates it, reuse revokes its family."""

    __tablename__ = "auth_refresh_token"
    __table_args__ = (
        sa.Index("ix_auth_refresh_token_family", "family"),
        sa.Index("ix_auth_refresh_token_user_id", "user_id"),
        sa.Index("ix_auth_refresh_token_expires_at", "expires_at"),
    )

    token_hash: str = Field(sa_column=sa.Column(sa.Text, primary_key=True))
    family: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    client_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    scope: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    user_id: str = Field(sa_column=sa.Column(sa.Text, nullable=False))
    patient: str | None = Field(default=None, sa_column=sa.Column(sa.Text, nullable=True))
    expires_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    rotated_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
    revoked_at: datetime | None = Field(
        default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True)
    )
