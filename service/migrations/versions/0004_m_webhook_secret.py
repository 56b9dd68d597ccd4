"""A job's own webhook secret (``jobs.webhook_secret``): the HMAC key of its webhook's signature,
used instead of ``GID_WEBHOOK_SECRET``; write-only (never in a response or the stored request).

Revision ID: 0004_m
Revises: 0004_l
Create Date: 2025-01-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_m"
down_revision = "0004_l"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("webhook_secret", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("webhook_secret")
