"""``gid up`` as a user runs it: starts Redis, API and worker under one data directory, writes the
token (mode 0600) once, and stops every child on SIGTERM / Ctrl-C."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from gid_core.processes import free_port
from tests.worker.helpers import processes_in

pytestmark = pytest.mark.slow


def start_up(data_dir: Path, port: int) -> tuple[subprocess.Popen, list[str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gid", "up", "--data-dir", str(data_dir), "--port", str(port)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while not any("press Ctrl-C" in ln for ln in lines):
        line = proc.stderr.readline()
        assert line or proc.poll() is None, f"gid up exited: {''.join(lines)}"
        lines.append(line)
        assert time.monotonic() < deadline, "".join(lines)
    return proc, lines


def stop_up(proc: subprocess.Popen, sig: int, data_dir: Path) -> None:
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    # Every child ran in the data directory: none may be left.
    deadline = time.monotonic() + 10
    while processes_in(data_dir):
        assert time.monotonic() < deadline, f"left behind: {processes_in(data_dir)}"
        time.sleep(0.1)


def test_gid_up_token_and_clean_shutdown(tmp_path: Path):
    data_dir, port = tmp_path / "gid", free_port()
    proc, lines = start_up(data_dir, port)
    try:
        token_file = data_dir / "token"
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        assert any(token in ln for ln in lines)  # printed once, on first start
        assert (data_dir / "url").read_text().strip() == f"http://127.0.0.1:{port}"
        r = httpx.get(f"http://127.0.0.1:{port}/v1/jobs", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["items"] == []
        assert (data_dir / "gid.db").is_file() and (data_dir / "redis" ).is_dir()
        assert len(processes_in(data_dir)) >= 3  # redis, api, worker (+ its pool process)
    finally:
        if proc.poll() is None:
            stop_up(proc, signal.SIGTERM, data_dir)
    assert not (data_dir / "url").exists()

    # Second start: the same token, not printed again; Ctrl-C (SIGINT) stops it as cleanly.
    proc, lines = start_up(data_dir, port)
    try:
        assert (data_dir / "token").read_text().strip() == token
        assert not any(token in ln for ln in lines)
    finally:
        stop_up(proc, signal.SIGINT, data_dir)

    # Killed outright: its children die with it (PR_SET_PDEATHSIG), nothing is orphaned.
    proc, _ = start_up(data_dir, port)
    stop_up(proc, signal.SIGKILL, data_dir)


def test_gid_up_refuses_a_busy_port(tmp_path: Path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "gid", "up", "--data-dir", str(tmp_path), "--port",
                              str(port)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"port {port} is already in use" in out.stderr


def _child_pid(data_dir: Path, parent: int, marker: bytes) -> int | None:
    """The live child of ``parent`` (`gid up`) whose command line has ``marker`` (Redis works in
    ``<data dir>/redis``)."""
    for pid in processes_in(data_dir) + processes_in(data_dir / "redis"):
        try:
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except (OSError, ValueError, IndexError):
            continue
    return None


def test_second_gid_up_on_the_same_data_dir_refuses(tmp_path: Path):
    data_dir, port = tmp_path / "gid", free_port()
    proc, _ = start_up(data_dir, port)
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
        out = subprocess.run([sys.executable, "-m", "gid", "up", "--data-dir", str(data_dir), "--port",
                              str(free_port())], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 1, out.stderr
        assert f"another `gid up` (pid {proc.pid}) is running on {data_dir}" in out.stderr
        # The first stack is untouched: its url file, its API.
        assert (data_dir / "url").read_text().strip() == f"http://127.0.0.1:{port}"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
        redis_dir = data_dir / "redis"  # one Redis on its append-only file
        assert sum(b"redis-server" in Path(f"/proc/{p}/cmdline").read_bytes() for p in processes_in(redis_dir)) == 1
    finally:
        stop_up(proc, signal.SIGTERM, data_dir)


def test_gid_up_restarts_a_dead_worker_and_redis_and_keeps_serving(tmp_path: Path):
    data_dir, port = tmp_path / "gid", free_port()
    proc, _ = start_up(data_dir, port)
    url = f"http://127.0.0.1:{port}"
    token = (data_dir / "token").read_text().strip()
    headers = {"Authorization": f"Bearer {token}"}
    try:
        for marker, ready in ((b"worker", b" ready."), (b"redis-server", b"Ready to accept connections")):
            name = "worker" if marker == b"worker" else "redis"
            log = data_dir / "logs" / f"{name}.log"
            offset = log.stat().st_size
            dead = _child_pid(data_dir, proc.pid, b"gid\0worker" if name == "worker" else marker)
            assert dead is not None
            os.kill(dead, signal.SIGKILL)
            deadline = time.monotonic() + 90
            while ready not in log.read_bytes()[offset:]:
                # The API serves all along.
                assert httpx.get(f"{url}/v1/jobs", headers=headers, timeout=5).status_code == 200
                assert proc.poll() is None, "gid up exited"
                assert time.monotonic() < deadline, log.read_text()[-2000:]
                time.sleep(0.2)
            new = _child_pid(data_dir, proc.pid, b"gid\0worker" if name == "worker" else marker)
            assert new is not None and new != dead
        assert httpx.get(f"{url}/v1/jobs", headers=headers, timeout=5).status_code == 200
    finally:
        stop_up(proc, signal.SIGTERM, data_dir)
