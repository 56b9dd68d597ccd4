"""Image-only datasets and distillation on unlabeled images (issue 12).

``datasets.labeled``: false for a dataset of images without labels (a folder, or a COCO file that
lists images only); its ``annotations_path`` is null when it was registered as a bare folder.
``jobs.unlabeled_dataset_id``: the image-only (or any) dataset a distillation job adds for its GID
losses; a queued or running job keeps it from being deleted, like its train and val datasets.

Revision ID: 0004_j
Revises: 0003_h
Create Date: 2025-01-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_j"
down_revision = "0003_h"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("labeled", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch.alter_column("annotations_path", existing_type=sa.Text(), nullable=True)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("unlabeled_dataset_id", sa.String(36), nullable=True))
        batch.create_foreign_key("fk_jobs_unlabeled_dataset_id", "datasets", ["unlabeled_dataset_id"], ["id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_constraint("fk_jobs_unlabeled_dataset_id", type_="foreignkey")
        batch.drop_column("unlabeled_dataset_id")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("labeled")
        batch.alter_column("annotations_path", existing_type=sa.Text(), nullable=False)
