"""Deleted datasets and models: ``deleted_at`` marks a row whose files were freed.

The row stays so that finished jobs keep their references (``jobs.train_dataset_id`` is NOT NULL,
and a job's history names what it was trained on); every API lookup treats it as gone (404).
Adding a nullable column is a plain ``ALTER TABLE ... ADD COLUMN`` on SQLite too (no table rebuild).

Revision ID: 0002_d
Revises: 0002_c
Create Date: 2025-01-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_d"
down_revision = "0002_c"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    for table in ("datasets", "models"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("deleted_at", UTC, nullable=True))


def downgrade() -> None:
    for table in ("datasets", "models"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("deleted_at")
