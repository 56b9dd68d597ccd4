"""The suite's own Redis and PostgreSQL servers (``tests/redis_server.py``, ``tests/pg_server.py``)
when the port ``free_port()`` chose is taken before the server binds it, as happens when parallel
test workers pick ports at the same moment: the server starts on another port, and a server that
already held the port is never mistaken for the new one."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from gid_core.processes import free_port
from tests import pg_server, redis_server


def ports_starting_with(taken: int) -> Iterator[int]:
    yield taken
    while True:
        yield free_port()


def test_redis_starts_on_another_port_when_its_port_is_taken(monkeypatch):
    first = redis_server.start_redis()
    try:
        ports = ports_starting_with(first.port)
        monkeypatch.setattr(redis_server, "free_port", lambda: next(ports))
        second = redis_server.start_redis()
        try:
            assert second.port != first.port and second.process.poll() is None
            assert second.client().info("server")["process_id"] == second.process.pid
        finally:
            second.stop()
        assert first.process.poll() is None  # untouched
    finally:
        first.stop()


@pytest.mark.skipif(pg_server.find_pg_bin() is None, reason="PostgreSQL server binaries not found")
def test_postgres_starts_on_another_port_when_its_port_is_taken(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        ports = ports_starting_with(holder.getsockname()[1])
        monkeypatch.setattr(pg_server, "free_port", lambda: next(ports))
        server = pg_server.start_postgres()
        try:
            assert server.port != holder.getsockname()[1]
            server.create_database("probe")
        finally:
            server.stop()
