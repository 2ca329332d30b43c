"""SMART App Launch: app_user, app clients (redirect URIs, public), authorization flows, codes,
refresh tokens and login failures

People sign in at /auth/authorize (app_user: a username, the FHIR resource the person is, an
scrypt password hash); app clients register exact redirect URIs and may be public (PKCE, no
secret). auth_flow holds an authorization request between its pages, auth_code the one-time
codes, auth_refresh_token the rotating refresh tokens (a family per sign-in), and
auth_login_failure the failed sign-ins the per-user and per-address limits count, shared by
every process.

Revision ID: 0017
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0017"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "oauth_client",
        sa.Column(
            "redirect_uris",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
    )
    op.add_column(
        "oauth_client", sa.Column("public", sa.Boolean(), server_default=sa.false(), nullable=False)
    )
    op.create_table(
        "app_user",
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("fhir_user", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=True),
        sa.Column("disabled", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", name="pk_app_user"),
        sa.UniqueConstraint("username", name="uq_app_user_username"),
    )
    op.create_table(
        "auth_login_failure",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_auth_login_failure"),
    )
    op.create_index("ix_auth_login_failure_key_at", "auth_login_failure", ["key", "at"])
    op.create_table(
        "auth_flow",
        sa.Column("flow_id", sa.Text(), nullable=False),
        sa.Column("browser_hash", sa.Text(), nullable=False),
        sa.Column("csrf_token", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=True),
        sa.Column("nonce", sa.Text(), nullable=True),
        sa.Column("code_challenge", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=True),
        sa.Column("patient", sa.Text(), nullable=True),
        sa.Column("upstream", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("flow_id", name="pk_auth_flow"),
    )
    op.create_index("ix_auth_flow_expires_at", "auth_flow", ["expires_at"])
    op.create_table(
        "auth_code",
        sa.Column("code_hash", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("redirect_uri", sa.Text(), nullable=False),
        sa.Column("code_challenge", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("patient", sa.Text(), nullable=True),
        sa.Column("nonce", sa.Text(), nullable=True),
        sa.Column("family", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("code_hash", name="pk_auth_code"),
    )
    op.create_index("ix_auth_code_expires_at", "auth_code", ["expires_at"])
    op.create_table(
        "auth_refresh_token",
        sa.Column("token_hash", sa.Text(), nullable=False),
        sa.Column("family", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Text(), nullable=False),
        sa.Column("patient", sa.Text(), nullable=True),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rotated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("token_hash", name="pk_auth_refresh_token"),
    )
    op.create_index("ix_auth_refresh_token_family", "auth_refresh_token", ["family"])
    op.create_index("ix_auth_refresh_token_user_id", "auth_refresh_token", ["user_id"])
    op.create_index("ix_auth_refresh_token_expires_at", "auth_refresh_token", ["expires_at"])


def downgrade() -> None:
    op.drop_table("auth_refresh_token")
    op.drop_table("auth_code")
    op.drop_table("auth_flow")
    op.drop_table("auth_login_failure")
    op.drop_table("app_user")
    op.drop_column("oauth_client", "public")
    op.drop_column("oauth_client", "redirect_uris")
