"""Alembic migrations create exactly the ORM schema, on SQLite and PostgreSQL; settings rules."""

from __future__ import annotations

import json
import time

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from pydantic import ValidationError

from service.core.config import Settings
from service.core.db import make_engine
from service.migrate import alembic_config, current_revision, upgrade_to_head
from service.models import Base


def head_revision() -> str:
    """The newest migration (one head: the versions form a single chain)."""
    (head,) = ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads()
    return head


def test_migrated_schema_matches_models(db_url):
    upgrade_to_head(db_url)  # idempotent at head
    assert current_revision(db_url) == head_revision()
    engine = make_engine(db_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []


def test_downgrade_and_upgrade_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade_to_head(url)
    command.downgrade(alembic_config(url), "base")
    assert current_revision(url) is None
    upgrade_to_head(url)
    assert current_revision(url) == head_revision()


def test_sqlite_pragmas(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'x.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
    engine.dispose()


def test_settings_refuse_default_secret_outside_local(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="GID_SECRET_KEY must be set"):
        Settings(env="production", data_dir=tmp_path)
    with pytest.raises(ValidationError, match="at least 32 characters"):
        Settings(env="production", data_dir=tmp_path, secret_key="x" * 20)
    ok = Settings(env="production", data_dir=tmp_path, secret_key="s" * 40)
    assert ok.database_url == f"sqlite:///{tmp_path / 'gid.db'}"


def test_settings_from_environment(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.setenv("GID_DATA_ROOTS", json.dumps([str(tmp_path / "link")]))
    monkeypatch.setenv("GID_MAX_ATTEMPTS", "5")
    monkeypatch.setenv("GID_DATA_DIR", str(tmp_path / "d"))
    s = Settings()
    assert s.data_roots == [tmp_path / "real"] and s.max_attempts == 5 and s.data_dir == tmp_path / "d"
    with pytest.raises(ValidationError, match="at most half"):
        Settings(job_lease_seconds=20, job_heartbeat_seconds=15)


# Rows of every table that hangs off a job, at the revision before the migrations that rebuild
# ``jobs`` / ``datasets`` on SQLite (batch mode copies the table, drops the old one and renames).
_ROWS_BEFORE_REBUILDS = "0003_h"
_SEED = [
    "INSERT INTO owners (id, name, created_at) VALUES ('o', 'alice', '2026-01-01')",
    "INSERT INTO datasets (id, owner_id, name, source, annotations_path, images_path, num_images,"
    " num_annotations, categories, created_at) VALUES ('d', 'o', 'set', 'path', '/a.json', '/i', 1, 1,"
    " '[\"x\"]', '2026-01-01')",
    "INSERT INTO jobs (id, owner_id, kind, status, config, engine_config, request_hash, train_dataset_id,"
    " progress, cancel_requested, attempts, created_at, updated_at) VALUES ('j', 'o', 'train',"
    " 'succeeded', '{}', '{}', 'h', 'd', '{}', 0, 1, '2026-01-01', '2026-01-01')",
    "INSERT INTO metrics (job_id, name, step, value) VALUES ('j', 'loss', 1, 0.5)",
    "INSERT INTO artifacts (id, job_id, name, path, size, sha256, created_at) VALUES ('a', 'j', 'm',"
    " '/m', 1, 's', '2026-01-01')",
    "INSERT INTO job_attempts (job_id, number, started_at) VALUES ('j', 1, '2026-01-01')",
    "INSERT INTO job_events (job_id, kind, data, created_at) VALUES ('j', 'status', '{}', '2026-01-01')",
    "INSERT INTO job_tags (job_id, tag) VALUES ('j', 'keep')",
]
_CHILD_TABLES = ("metrics", "artifacts", "job_attempts", "job_events", "job_tags")


def test_upgrading_sqlite_keeps_every_row_that_hangs_off_a_job(tmp_path):
    """Table rebuilds must not cascade: with foreign keys on, SQLite's DROP TABLE deletes the
    rows that reference the dropped table (ON DELETE CASCADE) before the rename puts it back."""
    import sqlite3

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    with engine.connect() as connection:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, _ROWS_BEFORE_REBUILDS)
        connection.commit()
    engine.dispose()
    with sqlite3.connect(tmp_path / "old.db") as db:
        for statement in _SEED:
            db.execute(statement)
    upgrade_to_head(url)
    with sqlite3.connect(tmp_path / "old.db") as db:
        counts = {table: db.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in _CHILD_TABLES}
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    assert counts == dict.fromkeys(_CHILD_TABLES, 1)




def _upgrade_after_barrier(url: str, barrier, pause_between_steps: bool) -> None:
    if pause_between_steps:
        # On SQLite alembic commits each migration step on its own: pause after each commit, so
        # that another process gets the database between two steps of this one.
        from contextlib import contextmanager

        from alembic.runtime.migration import MigrationContext

        begin = MigrationContext.begin_transaction

        def begin_then_pause(self, _per_migration: bool = False):
            transaction = begin(self, _per_migration=_per_migration)
            if not _per_migration:
                return transaction

            @contextmanager
            def paused():
                with transaction:
                    yield
                time.sleep(0.3)

            return paused()

        MigrationContext.begin_transaction = begin_then_pause
    barrier.wait(timeout=120)
    upgrade_to_head(url)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("pause_between_steps", [True, False], ids=["paused", "as-is"])
def test_concurrent_start_ups_migrate_a_fresh_sqlite_database_once(tmp_path, pause_between_steps):
    """Every API worker process migrates at start-up (``gid serve`` runs two): started together on a
    fresh SQLite file, all of them must come up with the database at head, none failing on a
    table or column another one has just added (seen in a test run: "duplicate column name:
    deleted_at", the second API worker having read the revision between two steps of the first)."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    url = f"sqlite:///{tmp_path / 'race.db'}"
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_upgrade_after_barrier, args=(url, barrier, pause_between_steps)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert current_revision(url) == head_revision()
