"""Alembic migrations driven from code (no alembic.ini): ``upgrade_to_head(url)``.

The API runs this at start-up, so a fresh deployment creates its schema and an upgraded one
migrates before serving. Every API process does (``gid serve`` runs two workers, a deployment may
run replicas), so one migrates at a time, from reading the revision to its last commit: on
PostgreSQL under an advisory lock; on SQLite, where alembic commits each step on its own (so
``BEGIN IMMEDIATE`` leaves a gap between steps in which another process read a stale revision and
failed on "duplicate column"), under an exclusive lock on a file beside the database.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from service.core.db import make_engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x6769645F6D6967  # "gid_mig": any constant shared by every process of a deployment


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolation
    return cfg


SQLITE_LOCK_SUFFIX = ".migrate-lock"


def upgrade_to_head(url: str) -> None:
    """Migrate the database at ``url`` to the newest revision (a no-op when it is current)."""
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection, _one_migrator(connection, url):
            sqlite = connection.dialect.name == "sqlite"
            if sqlite:
                _sqlite_foreign_keys(connection, on=False)
            cfg = alembic_config(url)
            cfg.attributes["connection"] = connection
            command.upgrade(cfg, "head")
            if sqlite:
                _check_sqlite_foreign_keys(connection)
            connection.commit()
    finally:
        engine.dispose()


@contextmanager
def _one_migrator(connection: Connection, url: str) -> Iterator[None]:
    """Held by one process of the deployment at a time (see the module docstring)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_LOCK_KEY})
        connection.commit()  # the lock is session-level: it outlives this transaction
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_LOCK_KEY})
            connection.commit()
        return
    database = make_url(url).database
    if not database or database == ":memory:":  # private to this process
        yield
        return
    with open(database + SQLITE_LOCK_SUFFIX, "ab") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield


def _sqlite_foreign_keys(connection, *, on: bool) -> None:
    """Switch SQLite's foreign-key enforcement (outside any transaction, where the pragma works).

    Migrations run with it off, as alembic's batch mode requires: batch mode rebuilds a table by
    copying it, dropping the old one and renaming the copy, and with enforcement on that DROP
    refuses (RESTRICT) or deletes every row that references the table (CASCADE: events, attempts,
    metric points). ``_check_sqlite_foreign_keys`` then proves nothing dangles.
    """
    connection.connection.driver_connection.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


def _check_sqlite_foreign_keys(connection) -> None:
    """Refuse to commit a migration that left a row pointing at nothing."""
    broken = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
    if broken:
        tables = sorted({row[0] for row in broken})
        raise RuntimeError(f"migration left {len(broken)} rows with dangling foreign keys in {', '.join(tables)}")


def current_revision(url: str) -> str | None:
    """The revision the database at ``url`` is at (None before the first migration)."""
    from alembic.runtime.migration import MigrationContext

    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
