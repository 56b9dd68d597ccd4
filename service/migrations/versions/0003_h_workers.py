"""Worker registry and gang leases (issue 11: multi-node jobs).

``workers``: every worker node registers its capacity (GPU ids, or CPU device slots) and heartbeats
it; the API refuses a job no set of live workers could hold. ``job_nodes``: the node slots of a
multi-node job's attempt (``node_rank`` 0 is the leader, which also publishes the rendezvous
endpoint). ``jobs.nodes``: how many nodes a job spans.

Revision ID: 0003_h
Revises: 0003_f
Create Date: 2025-01-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_h"
down_revision = "0003_f"
branch_labels = None
depends_on = None

UTC = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("nodes", sa.Integer(), nullable=False, server_default="1"))
    op.create_table(
        "workers",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("address", sa.String(255), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("started_at", UTC, nullable=False),
        sa.Column("heartbeat_at", UTC, nullable=False),
    )
    op.create_table(
        "job_nodes",
        sa.Column("job_id", sa.String(36), sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("attempt", sa.Integer(), primary_key=True),
        sa.Column("node_rank", sa.Integer(), primary_key=True),
        sa.Column("worker_node", sa.String(255), nullable=False),
        sa.Column("worker_id", sa.String(255), nullable=False),
        sa.Column("endpoint", sa.String(255), nullable=True),
        sa.Column("lease_expires_at", UTC, nullable=False),
        sa.Column("joined_at", UTC, nullable=False),
        sa.UniqueConstraint("job_id", "attempt", "worker_node", name="uq_job_nodes_worker"),
    )


def downgrade() -> None:
    op.drop_table("job_nodes")
    op.drop_table("workers")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("nodes")
