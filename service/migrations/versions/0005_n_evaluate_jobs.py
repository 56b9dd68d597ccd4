"""``kind: evaluate`` jobs (a model on a dataset, COCO AP): the jobs' kind check allows it.

SQLite cannot alter a CHECK constraint, and batch mode's table copy would drop ``jobs``, whose
implicit delete cascades to every job's events, attempts and metric points (foreign keys are on,
and cannot be switched off inside the migration's transaction). A CHECK constraint leaves the
stored rows' format unchanged, so on SQLite the table's schema text is edited in place, the
procedure SQLite documents for such changes (lang_altertable.html, "otheralter"); PostgreSQL
alters the constraint.

Revision ID: 0005_n
Revises: 0004_m
Create Date: 2026-11-26
"""

from alembic import op

revision = "0005_n"
down_revision = "0004_m"
branch_labels = None
depends_on = None

OLD = "kind IN ('train', 'distill')"
NEW = "kind IN ('train', 'distill', 'evaluate')"


def upgrade() -> None:
    _replace_kind_check(OLD, NEW)


def downgrade() -> None:
    # The old check cannot hold evaluation jobs: they go (their events, attempts and metrics cascade).
    op.execute("DELETE FROM jobs WHERE kind = 'evaluate'")
    _replace_kind_check(NEW, OLD)


def _replace_kind_check(old: str, new: str) -> None:
    bind = op.get_bind()
    if bind.dialect.name != "sqlite":
        op.drop_constraint("ck_jobs_kind", "jobs", type_="check")
        op.create_check_constraint("ck_jobs_kind", "jobs", new)
        return
    sql = bind.exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'jobs'").scalar()
    if sql.count(old) != 1:
        raise RuntimeError(f"jobs table: expected the check {old!r} once in its schema")
    version = bind.exec_driver_sql("PRAGMA schema_version").scalar()
    bind.exec_driver_sql("PRAGMA writable_schema = ON")
    try:
        bind.exec_driver_sql("UPDATE sqlite_master SET sql = ? WHERE type = 'table' AND name = 'jobs'",
                             (sql.replace(old, new),))
        bind.exec_driver_sql(f"PRAGMA schema_version = {int(version) + 1}")  # other connections reload it
    finally:
        bind.exec_driver_sql("PRAGMA writable_schema = OFF")
