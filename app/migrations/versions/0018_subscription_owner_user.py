"""subscription.owner_user: the person a Subscription's notifications are judged for (issue 11)

A person's token (``fhirUser``) sees only what that person may see (app/fhir/access.py); the
notifications of a Subscription it creates are judged with the same limits, so the person is
kept with the subscription like its scopes, organisation and patient.

Revision ID: 0018
Revises: 0014
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("subscription", sa.Column("owner_user", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("subscription", "owner_user")
