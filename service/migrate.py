"""Alembic migrations driven from code (no alembic.ini): ``upgrade_to_head(url)``.

The API runs this at start-up, so a fresh deployment creates its schema and an upgraded one
migrates before serving. On PostgreSQL an advisory lock serialises concurrent start-ups (several API
replicas); on SQLite ``BEGIN IMMEDIATE`` does the same.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.pool import NullPool

from service.core.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x6769645F6D6967  # "gid_mig": any constant shared by every process of a deployment


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    return cfg


def upgrade_to_head(url: str) -> None:
    """Migrate the database at ``url`` to the newest revision (a no-op when it is current)."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            postgres = connection.dialect.name == "postgresql"
            if postgres:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
                connection.commit()  # the lock is session-level: it outlives this transaction
            try:
                cfg = alembic_config(url)
                cfg.attributes["connection"] = connection
                command.upgrade(cfg, "head")
                connection.commit()
            finally:
                if postgres:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
                    connection.commit()
    finally:
        engine.dispose()


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
