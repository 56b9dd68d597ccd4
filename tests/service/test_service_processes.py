"""Serving with several API processes (``gid serve --workers N``, real HTTP) and the per-request
cost of authentication (one indexed statement)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import event, select

from gid_core.processes import free_port, kill_process_group
from service import crud
from service.core.db import make_engine, make_session_factory
from service.migrate import upgrade_to_head
from service.models import ApiToken, Owner


def spawned_children(pid: int) -> list[int]:
    """Pids of the multiprocessing children (uvicorn's workers) of ``pid``."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            children.append(int(entry.name))
    return children


def test_gid_serve_runs_the_configured_number_of_api_processes(tmp_path, redis_server):
    url = f"sqlite:///{tmp_path / 'gid.db'}"
    upgrade_to_head(url)
    engine = make_engine(url)
    with make_session_factory(engine)() as s:
        owner = crud.get_or_create_owner(s, name="alice")
        token = crud.create_token(s, owner_id=owner.id, secret="s" * 32)
    engine.dispose()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
    env.update(GID_DATA_DIR=str(tmp_path / "data"), GID_DATABASE_URL=url, GID_REDIS_URL=redis_server.url,
               GID_SECRET_KEY="s" * 32, GID_API_WORKERS="2")
    log = open(tmp_path / "api.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gid", "serve", "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "api.log").read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200 and len(spawned_children(proc.pid)) == 2:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gid serve did not come up with 2 workers"
            time.sleep(0.1)
        # Fresh connections each time: the kernel spreads them over both processes' accepts.
        for _ in range(20):
            r = httpx.get(f"{base}/v1/jobs", headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.status_code == 200 and r.json()["total"] == 0, r.text
        assert httpx.get(f"{base}/v1/jobs", headers={"Authorization": "Bearer nope"}, timeout=10).status_code == 401
        # Keep-alive responses are not held back by Nagle's algorithm: with it, every response on a
        # reused connection waits for the client's delayed ACK, >= 40 ms on Linux.
        with httpx.Client(base_url=base, timeout=10) as client:
            client.get("/healthz")
            times = []
            for _ in range(21):
                start = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                times.append(time.perf_counter() - start)
        assert sorted(times)[10] < 0.035, f"median keep-alive response {sorted(times)[10] * 1000:.1f} ms"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        finally:
            kill_process_group(proc, grace_seconds=0)
            log.close()
    assert proc.returncode == 0, (tmp_path / "api.log").read_text()


def test_authentication_is_one_indexed_statement(api):
    job_list = "/v1/jobs"
    read_engine = api.client.app.state.read_session_factory.kw["bind"]
    statements: list[str] = []

    def record(_conn, _cursor, statement, *_args) -> None:
        statements.append(statement.lower())

    event.listen(read_engine, "before_cursor_execute", record)
    try:
        assert api.get(job_list).status_code == 200
    finally:
        event.remove(read_engine, "before_cursor_execute", record)
    auth = [s for s in statements if "api_tokens" in s or "from owners" in s]
    assert len(auth) == 1, statements
    if read_engine.dialect.name == "sqlite":  # the plan searches the token hash's unique index
        stmt = select(Owner.id).join(ApiToken, ApiToken.owner_id == Owner.id).where(ApiToken.token_hash == "x")
        sql = str(stmt.compile(read_engine, compile_kwargs={"literal_binds": True}))
        with read_engine.connect() as conn:
            plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}"))
        assert "api_tokens USING INDEX" in plan or "api_tokens USING COVERING INDEX" in plan, plan
