"""Fixtures of the service tests: real SQLite and PostgreSQL, real Redis, the real app.

Every test that takes ``db_url`` (directly or through ``api``) runs twice: on a fresh SQLite file and
on the session's PostgreSQL database (tables truncated between tests). The PostgreSQL cluster is
started once per session from the Debian server binaries; without them the PostgreSQL variants are
skipped, or fail when ``CI=true``.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service import crud
from service.core.config import Settings
from service.core.db import make_engine, make_session_factory
from service.main import create_app
from service.migrate import upgrade_to_head
from service.models import Base, Job
from tests.pg_server import PostgresServer, find_pg_bin, start_postgres
from tests.redis_server import RedisServer, start_redis
from tests.service.helpers import KiB, Api


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    if find_pg_bin() is None:
        message = "PostgreSQL server binaries (initdb, pg_ctl) not found"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " and CI=true: the PostgreSQL tests must run")
        pytest.skip(message)
    server = start_postgres()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_database(pg_server: PostgresServer) -> Iterator[str]:
    """One database for the whole session, migrated to head; dropped at the end."""
    name = f"gid_service_{uuid.uuid4().hex[:8]}"
    url = pg_server.create_database(name)
    upgrade_to_head(url)
    yield url
    pg_server.drop_database(name)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'gid.db'}"
        upgrade_to_head(url)
        yield url
        return
    url = request.getfixturevalue("pg_database")
    yield url
    engine = make_engine(url)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    engine.dispose()


@pytest.fixture
def session_factory(db_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(db_url)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(session_factory) -> Iterator[Session]:
    with session_factory() as s:
        yield s


@pytest.fixture
def make_job(session):
    """``make_job()`` inserts a queued job of one owner (``make_job.owner_id``) on one dataset."""
    owner = crud.get_or_create_owner(session, name="owner")
    dataset = crud.create_dataset(
        session, owner_id=owner.id, name="d", source="path", annotations_path="/a.json", images_path="/i",
        num_images=1, num_annotations=1, categories=["a"],
    )

    def make() -> Job:
        job, created = crud.create_job(
            session, owner_id=owner.id, kind="train", name=None, config={}, engine_config={}, request_hash="h",
            idempotency_key=None, train_dataset_id=dataset.id,
        )
        assert created
        return job

    make.owner_id = owner.id
    return make


@pytest.fixture
def settings(db_url: str, tmp_path: Path, redis_server: RedisServer) -> Settings:
    roots = tmp_path / "roots"
    roots.mkdir()
    return Settings(
        env="local",
        data_dir=tmp_path / "data",
        database_url=db_url,
        redis_url=redis_server.url,
        data_roots=[roots],
        max_upload_bytes=256 * KiB,
        max_annotation_bytes=64 * KiB,
        max_json_body_bytes=64 * KiB,
        max_unzipped_bytes=4 * 1024 * KiB,
        max_zip_members=500,
        max_devices=4,
    )


@pytest.fixture
def api(settings: Settings, redis_server: RedisServer) -> Iterator[Api]:
    redis_server.client().flushdb()
    app = create_app(settings)
    with TestClient(app) as client:
        api = Api(client=client, settings=settings, redis=redis_server)
        with api.session() as s:
            for who in ("alice", "bob"):
                owner = crud.get_or_create_owner(s, name=who)
                api.owner_ids[who] = owner.id
                api.tokens[who] = crud.create_token(s, owner_id=owner.id, secret=settings.secret_key)
        yield api
