"""The worker's small parts: Celery configuration, the runner, failure descriptions."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gid_core.launch import LaunchError
from service.core.config import Settings
from service.queue import JOB_QUEUE, RUN_JOB_TASK
from worker.celery_app import app
from worker.runner import describe_exception


def test_celery_configuration():
    conf = app.conf
    assert conf.task_default_queue == JOB_QUEUE  # where the API sends (service.queue)
    assert {"worker.tasks", "worker.reaper"} <= set(conf.include)  # imported by a starting worker
    app.loader.import_default_modules()
    assert RUN_JOB_TASK in app.tasks
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_ignore_result and not conf.result_backend
    assert conf.task_routes[RUN_JOB_TASK]["queue"] == JOB_QUEUE
    assert conf.task_time_limit > conf.task_soft_time_limit
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_soft_time_limit


def test_worker_settings_from_environment(monkeypatch):
    monkeypatch.setenv("GID_JOB_TIME_LIMIT_SECONDS", "7200")
    monkeypatch.setenv("GID_REAPER_PERIOD_SECONDS", "2.5")
    s = Settings()
    assert s.reaper_period_seconds == 2.5
    assert s.broker_visibility_timeout_seconds == 7200 + 3600
    monkeypatch.setenv("GID_BROKER_VISIBILITY_TIMEOUT_SECONDS", "600")
    assert Settings().broker_visibility_timeout_seconds == 600
    monkeypatch.setenv("GID_CANCEL_GRACE_SECONDS", "0")
    with pytest.raises(ValueError, match="cancel_grace_seconds"):
        Settings()


def test_describe_exception():
    assert describe_exception(ValueError("bad value")) == "ValueError: bad value"
    assert describe_exception(KeyError()) == "KeyError"
    child_traceback = (
        "Traceback (most recent call last):\n  File \"engine.py\", line 3, in run_job\n"
        "FileNotFoundError: [Errno 2] No such file: 'x.json'\n"
    )
    err = LaunchError(rank=1, exc_type="FileNotFoundError", exc_message="[Errno 2] No such file: 'x.json'",
                      traceback_text=child_traceback, error_pid=1234)
    assert "rank 1 failed first" in str(err) and child_traceback in str(err)
    assert describe_exception(err) == "FileNotFoundError: [Errno 2] No such file: 'x.json' (rank 1 failed first)"


def test_runner_reports_a_bad_config_as_failed(tmp_path: Path):
    """The runner itself, as the supervisor starts it: an invalid job file ends in a result file
    with status failed and the validation message, exit code 1."""
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"kind": "train"}))
    result = tmp_path / "result.json"
    out = subprocess.run(
        [sys.executable, "-m", "worker.runner", "--config", str(config), "--output-dir", str(tmp_path / "out"),
         "--result", str(result)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 1
    payload = json.loads(result.read_text())
    assert payload["status"] == "failed" and "validation error" in payload["error"] and "student" in payload["error"]


def test_runner_dies_with_its_parent(tmp_path: Path):
    """``die_with_parent``: a runner whose supervisor is gone does not keep training."""
    code = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'from gid_core.processes import die_with_parent; import os, time; "
        f"die_with_parent(os.getppid()); open(r\"{tmp_path}/child.pid\", \"w\").write(str(os.getpid())); time.sleep(60)'])\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    pid_file = tmp_path / "child.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    child = int(pid_file.read_text())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child):
        assert time.monotonic() < deadline, "the child outlived its parent"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
