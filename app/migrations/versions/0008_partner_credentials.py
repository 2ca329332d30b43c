"""Partner credentials: partner_credentials

How carecoord authenticates to each partner's FHIR server when it delivers referrals
(OAuth 2.0 client_credentials with a client secret, or SMART Backend Services
private_key_jwt), keyed by the local Endpoint id; secrets and private keys are stored
encrypted (app/referrals/credentials.py).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "partner_credentials",
        sa.Column("endpoint_id", sa.Text(), nullable=False),
        sa.Column("token_url", sa.Text(), nullable=False),
        sa.Column("client_id", sa.Text(), nullable=False),
        sa.Column("auth_method", sa.Text(), nullable=False),
        sa.Column("secret_encrypted", sa.Text(), nullable=True),
        sa.Column("private_key_encrypted", sa.Text(), nullable=True),
        sa.Column("kid", sa.Text(), nullable=True),
        sa.Column("alg", sa.Text(), nullable=True),
        sa.Column("updated", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.CheckConstraint(
            "auth_method IN ('client_secret', 'private_key_jwt')",
            name="ck_partner_credentials_auth_method",
        ),
        sa.CheckConstraint("alg IS NULL OR alg IN ('ES384', 'RS384')", name="ck_partner_credentials_alg"),
        sa.PrimaryKeyConstraint("endpoint_id", name="pk_partner_credentials"),
    )


def downgrade() -> None:
    op.drop_table("partner_credentials")
