"""Authorization server: oauth_client, auth_signing_key, auth_jti

Registered clients (secret hash or public JWKS), the server's token signing keys (rotated,
retired keys kept until their tokens expire) and the used client-assertion ids that stop a
replay (SMART Backend Services, RFC 7523).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "oauth_client",
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("secret_hash", sa.Text(), nullable=True),
        sa.Column("scopes", sa.Text(), nullable=False),
        sa.Column("organization", sa.Text(), nullable=True),
        sa.Column("patient", sa.Text(), nullable=True),
        sa.Column("jwks", sa.Text(), nullable=True),
        sa.Column("jwks_url", sa.Text(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name="pk_oauth_client"),
    )
    op.create_table(
        "auth_signing_key",
        sa.Column("kid", sa.Text(), nullable=False),
        sa.Column("private_jwk", sa.Text(), nullable=False),
        sa.Column("created", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("kid", name="pk_auth_signing_key"),
    )
    op.create_table(
        "auth_jti",
        sa.Column("issuer", sa.Text(), nullable=False),
        sa.Column("jti", sa.Text(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("issuer", "jti", name="pk_auth_jti"),
    )
    op.create_index("ix_auth_jti_expires_at", "auth_jti", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_auth_jti_expires_at", table_name="auth_jti")
    op.drop_table("auth_jti")
    op.drop_table("auth_signing_key")
    op.drop_table("oauth_client")
