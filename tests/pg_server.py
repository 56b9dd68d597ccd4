"""A throwaway PostgreSQL cluster for tests: ``start_postgres()`` -> ``PostgresServer``.

The cluster lives in a temporary folder, listens on a free port of 127.0.0.1 only, trusts local
connections (user ``gid``, no password) and runs with fsync off (a test cluster has nothing to keep).
PostgreSQL refuses to run as root, so as root the server commands run as the ``postgres`` user
(``runuser``) over a folder that user owns.

Plain functions, reused by the service and worker test suites::

    server = start_postgres()
    url = server.create_database("gid_test")   # SQLAlchemy URL
    ...
    server.drop_database("gid_test"); server.stop()
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from gid_core.processes import free_port

SUPERUSER = "gid"


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (PATH first, then Debian's versioned folders)."""
    found = shutil.which("pg_ctl")
    if found and shutil.which("initdb"):
        return Path(os.path.realpath(found)).parent
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(candidate) / "pg_ctl").exists() and (Path(candidate) / "initdb").exists():
            return Path(candidate)
    return None


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    return ["runuser", "-u", "postgres", "--", *cmd]


@dataclass
class PostgresServer:
    port: int
    base_dir: Path
    bin_dir: Path
    host: str = "127.0.0.1"
    user: str = SUPERUSER
    databases: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(host=self.host, port=self.port, user=self.user, dbname="postgres", autocommit=True) as conn:
            conn.execute(sql)

    def create_database(self, name: str) -> str:
        """Create database ``name`` (dropping a leftover one first) and return its URL."""
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._admin(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.databases:
            self.databases.remove(name)

    def stop(self) -> None:
        subprocess.run(
            _as_server_user([str(self.bin_dir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "immediate", "-w"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(self.base_dir, ignore_errors=True)


def start_postgres(*, bin_dir: Path | None = None, timeout_s: int = 60) -> PostgresServer:
    """initdb a fresh cluster in a temporary folder and start it; raises if the binaries are missing."""
    bin_dir = bin_dir or find_pg_bin()
    if bin_dir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl) not found")
    base_dir = Path(tempfile.mkdtemp(prefix="gid-pg-"))
    if os.geteuid() == 0:
        pg_user = pwd.getpwnam("postgres")
        os.chown(base_dir, pg_user.pw_uid, pg_user.pw_gid)
    server = PostgresServer(port=free_port(), base_dir=base_dir, bin_dir=bin_dir)
    try:
        _run(_as_server_user([
            str(bin_dir / "initdb"), "-D", str(server.data_dir), "-U", SUPERUSER, "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        ]))
        _start_on_free_port(server, timeout_s, attempts=3)
    except BaseException:
        log = base_dir / "server.log"
        if log.exists():
            print(log.read_text()[-4000:])
        server.stop()
        raise
    return server


def _start_on_free_port(server: PostgresServer, timeout_s: int, attempts: int) -> None:
    """``pg_ctl start`` on ``server.port``; on another free port when that one was taken between
    ``free_port()`` and the server's bind (parallel test workers pick ports at the same time)."""
    log = server.base_dir / "server.log"
    for attempt in range(1, attempts + 1):
        options = (
            f"-p {server.port} -c listen_addresses=127.0.0.1 -k {server.base_dir} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        try:
            _run(_as_server_user([
                str(server.bin_dir / "pg_ctl"), "start", "-D", str(server.data_dir), "-o", options,
                "-l", str(log), "-w", "-t", str(timeout_s),
            ]))
            return
        except RuntimeError:
            taken = log.exists() and "Address already in use" in log.read_text()
            if attempt == attempts or not taken:
                raise
            log.unlink()
            server.port = free_port()


def _run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
