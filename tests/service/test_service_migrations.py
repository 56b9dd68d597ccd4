"""Alembic migrations create exactly the ORM schema, on SQLite and PostgreSQL; settings rules."""

from __future__ import annotations

import json

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
