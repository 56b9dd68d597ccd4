"""Initial schema: owners, api_tokens, datasets, models, jobs, metrics, artifacts.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "owners",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, unique=True),
        sa.Column("created_at", UTC, nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("revoked_at", UTC, nullable=True),
    )
    op.create_index("ix_api_tokens_owner_id", "api_tokens", ["owner_id"])
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("annotations_path", sa.Text(), nullable=False),
        sa.Column("images_path", sa.Text(), nullable=False),
        sa.Column("num_images", sa.Integer(), nullable=False),
        sa.Column("num_annotations", sa.Integer(), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.CheckConstraint("source IN ('path', 'upload')", name="ck_datasets_source"),
    )
    op.create_index("ix_datasets_owner_created", "datasets", ["owner_id", "created_at"])
    # models.source_job_id -> jobs.id closes a cycle with jobs.*_model_id -> models.id. SQLite accepts
    # a key to a table created later (and cannot add one afterwards); PostgreSQL adds it below.
    source_job_fk = [sa.ForeignKey("jobs.id", ondelete="SET NULL", name="fk_models_source_job_id")] if sqlite else []
    op.create_table(
        "models",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("arch", sa.String(32), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("categories", sa.JSON(), nullable=True),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("source_job_id", sa.String(36), *source_job_fk, nullable=True),
        sa.Column("created_at", UTC, nullable=False),
    )
    op.create_index("ix_models_owner_created", "models", ["owner_id", "created_at"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner_id", sa.String(36), sa.ForeignKey("owners.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(200), nullable=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("engine_config", sa.JSON(), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("train_dataset_id", sa.String(36), sa.ForeignKey("datasets.id"), nullable=False),
        sa.Column("val_dataset_id", sa.String(36), sa.ForeignKey("datasets.id"), nullable=True),
        sa.Column("teacher_model_id", sa.String(36), sa.ForeignKey("models.id"), nullable=True),
        sa.Column("init_model_id", sa.String(36), sa.ForeignKey("models.id"), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=False),
        sa.Column("latest_metrics", sa.JSON(), nullable=True),
        sa.Column("final_metrics", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("lease_owner", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", UTC, nullable=True),
        sa.Column("heartbeat_at", UTC, nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("output_model_id", sa.String(36), sa.ForeignKey("models.id"), nullable=True),
        sa.Column("created_at", UTC, nullable=False),
        sa.Column("started_at", UTC, nullable=True),
        sa.Column("finished_at", UTC, nullable=True),
        sa.Column("updated_at", UTC, nullable=False),
        sa.UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        sa.CheckConstraint(
            "status IN ({})".format(", ".join(f"'{s}'" for s in JOB_STATUSES)), name="ck_jobs_status"
        ),
        sa.CheckConstraint("kind IN ('train', 'distill')", name="ck_jobs_kind"),
    )
    op.create_index("ix_jobs_owner_created", "jobs", ["owner_id", "created_at"])
    op.create_index("ix_jobs_status_updated", "jobs", ["status", "updated_at"])
    if not sqlite:
        op.create_foreign_key(
            "fk_models_source_job_id", "models", "jobs", ["source_job_id"], ["id"], ondelete="SET NULL"
        )
    op.create_table(
        "metrics",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("value", sa.Double(), nullable=False),
    )
    op.create_index("ix_metrics_job_name_step", "metrics", ["job_id", "name", "step"])
    op.create_table(
        "artifacts",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.String(512), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", UTC, nullable=False),
        sa.UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),
    )
    op.create_index("ix_artifacts_job_id", "artifacts", ["job_id"])


def downgrade() -> None:
    for table in ("artifacts", "metrics"):
        op.drop_table(table)
    if op.get_bind().dialect.name != "sqlite":
        op.drop_constraint("fk_models_source_job_id", "models", type_="foreignkey")
    for table in ("jobs", "models", "datasets", "api_tokens", "owners"):
        op.drop_table(table)
