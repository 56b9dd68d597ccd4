"""Database engine and session factory: SQLite for one machine, PostgreSQL for a deployment.

SQLite gets WAL (readers never block the writer), a busy timeout (writers wait instead of failing)
and foreign keys. Every SQLite transaction of a read-write engine starts with ``BEGIN IMMEDIATE``: a
deferred transaction that reads and then writes fails at once with "database is locked" when
another process committed in between (the busy timeout cannot help there), which the worker's
heartbeats would make common.

``BEGIN IMMEDIATE`` takes the one write lock, so it must not be paid by reads: a ``read_only``
engine (the API's GET requests) begins deferred transactions, which in WAL mode never wait for the
writer, and refuses writes (``PRAGMA query_only`` on SQLite, a read-only transaction on
PostgreSQL), so a write slipped into a GET handler fails loudly instead of racing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str, *, read_only: bool = False, **kwargs) -> Engine:
    """An engine for ``url`` with the per-backend settings above."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs
        )
        _configure_sqlite(engine, read_only=read_only)
        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        # psycopg (3) is the driver we ship.
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    engine = create_engine(url, pool_pre_ping=True, **kwargs)
    return engine.execution_options(postgresql_readonly=True) if read_only else engine


def _configure_sqlite(engine: Engine, *, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable in WAL mode up to the last checkpoint
        if read_only:
            cursor.execute("PRAGMA query_only=ON")
        cursor.close()

    begin = "BEGIN" if read_only else "BEGIN IMMEDIATE"

    @event.listens_for(engine, "begin")
    def _on_begin(connection) -> None:
        connection.exec_driver_sql(begin)


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows stay readable after the commit that each crud function ends with.
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that is rolled back if the block raises and always closed."""
    session = factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
