"""Job tags (``GET /v1/jobs?tag=``): one ``job_tags`` row per tag of a job.

Names need no schema change: jobs, datasets and models already have a ``name`` column, and
``service.lookup`` resolves unique names and id prefixes with the existing owner indexes.

Revision ID: 0003_f
Revises: 0003_e
Create Date: 2025-01-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_f"
down_revision = "0003_e"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_tags",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tag", sa.String(64), primary_key=True),
    )
    op.create_index("ix_job_tags_tag", "job_tags", ["tag"])


def downgrade() -> None:
    op.drop_index("ix_job_tags_tag", table_name="job_tags")
    op.drop_table("job_tags")
