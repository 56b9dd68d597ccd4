"""Experiments: a teacher / baseline / GID comparison made in one call (issue 10, item 4).

``experiments``: the request and the jobs it created; ``distill_job_id`` is filled in once the
teacher's own training job (when the request asked for one) has succeeded.

Revision ID: 0004_l
Revises: 0004_j
Create Date: 2025-01-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_l"
down_revision = "0004_j"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("teacher_job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("baseline_job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("distill_job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("updated_at", UTC, nullable=False),
    )
    op.create_index("ix_experiments_owner_created", "experiments", ["owner_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_experiments_owner_created", table_name="experiments")
    op.drop_table("experiments")
