"""Read-only sessions: GET requests never take SQLite's write lock, and cannot write."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from service.core.db import make_engine, make_session_factory, session_scope
from service.models import Owner


def test_read_only_session_refuses_writes(db_url: str):
    engine = make_engine(db_url, read_only=True)
    try:
        with session_scope(make_session_factory(engine)) as s:
            assert s.execute(text("SELECT 1")).scalar() == 1  # reads work
            s.add(Owner(name="mallory"))
            with pytest.raises(DBAPIError, match="(?i)read.?only"):
                s.flush()
    finally:
        engine.dispose()
    # The read-write engine writes as before.
    engine = make_engine(db_url)
    try:
        with session_scope(make_session_factory(engine)) as s:
            s.add(Owner(name="alice-rw"))
            s.commit()
    finally:
        engine.dispose()


def test_get_is_answered_while_another_process_holds_the_write_lock(api, db_url: str):
    if not db_url.startswith("sqlite"):
        pytest.skip("SQLite's single write lock")
    job_list = "/v1/jobs"
    assert api.get(job_list).status_code == 200
    # A writer elsewhere (the worker's heartbeat, a submission) holds the write lock.
    writer = sqlite3.connect(db_url.removeprefix("sqlite:///"), isolation_level=None, timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        start = time.perf_counter()
        r = api.get(job_list)
        elapsed = time.perf_counter() - start
        assert r.status_code == 200, r.text
        assert elapsed < 2.0  # a BEGIN IMMEDIATE would wait for the lock (busy timeout: 30 s)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
