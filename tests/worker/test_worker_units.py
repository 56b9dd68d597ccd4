"""The worker's small parts: Celery configuration, file helpers, failure descriptions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gid_core.launch import LaunchError
from service import queue
from worker.celery_app import QUEUE, RUN_JOB_TASK, app
from worker.config import WorkerSettings
from worker.files import checkpoint_iteration, finite_only, latest_checkpoint, read_json, tail_lines, write_json_atomic
from worker.runner import describe_exception


def test_celery_configuration():
    conf = app.conf
    assert (QUEUE, RUN_JOB_TASK) == (queue.QUEUE_NAME, queue.TASK_NAME)  # what the API sends
    assert {"worker.tasks", "worker.reaper"} <= set(conf.include)  # imported by a starting worker
    app.loader.import_default_modules()
    assert RUN_JOB_TASK in app.tasks
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1 and conf.worker_concurrency == 1
    assert conf.task_ignore_result and not conf.result_backend
    assert conf.task_routes[RUN_JOB_TASK]["queue"] == QUEUE
    assert conf.task_time_limit > conf.task_soft_time_limit
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_soft_time_limit


def test_worker_settings_from_environment(monkeypatch):
    monkeypatch.setenv("GID_JOB_TIME_LIMIT_SECONDS", "7200")
    monkeypatch.setenv("GID_REAPER_PERIOD_SECONDS", "2.5")
    s = WorkerSettings()
    assert s.reaper_period_seconds == 2.5
    assert s.broker_visibility_timeout_seconds == 7200 + 3600
    monkeypatch.setenv("GID_BROKER_VISIBILITY_TIMEOUT_SECONDS", "600")
    assert WorkerSettings().broker_visibility_timeout_seconds == 600
    monkeypatch.setenv("GID_CANCEL_GRACE_SECONDS", "0")
    with pytest.raises(ValueError, match="cancel_grace_seconds"):
        WorkerSettings()


def test_write_json_atomic_replaces_nan_and_leaves_no_temp_files(tmp_path: Path):
    path = tmp_path / "out" / "result.json"
    write_json_atomic(path, {"a": 1.5, "b": math.nan, "c": [math.inf, 2], "d": {"e": -math.inf}})
    assert json.loads(path.read_text()) == {"a": 1.5, "b": None, "c": [None, 2], "d": {"e": None}}
    write_json_atomic(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]
    with pytest.raises(TypeError):
        write_json_atomic(path, {"x": object()})
    assert read_json(path) == {"a": 2}  # the old file is intact after a failed write
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]
    assert read_json(tmp_path / "missing.json") is None


def test_finite_only():
    assert finite_only({"x": (1.0, math.nan), "y": True, "z": None, 3: "s"}) == {
        "x": [1.0, None], "y": True, "z": None, "3": "s"}


def test_checkpoint_pointer(tmp_path: Path):
    assert latest_checkpoint(tmp_path) is None and checkpoint_iteration(tmp_path) is None
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    (ckpts / "last").write_text("ckpt_0000500.pt")
    assert checkpoint_iteration(tmp_path) is None  # the pointer names a file that is not there
    (ckpts / "ckpt_0000500.pt").write_bytes(b"x")
    assert latest_checkpoint(tmp_path) == ckpts / "ckpt_0000500.pt"
    assert checkpoint_iteration(tmp_path) == 500


def test_tail_lines(tmp_path: Path):
    log = tmp_path / "a.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)))
    assert tail_lines(log, 3) == "line 97\nline 98\nline 99"
    assert tail_lines(log, 3, max_bytes=10) == "line 99"  # only the last bytes are read
    assert tail_lines(tmp_path / "missing.log") == ""


def test_describe_exception():
    assert describe_exception(ValueError("bad value")) == "ValueError: bad value"
    assert describe_exception(KeyError()) == "KeyError"
    child_traceback = (
        "Traceback (most recent call last):\n  File \"engine.py\", line 3, in run_job\n"
        "FileNotFoundError: [Errno 2] No such file: 'x.json'\n"
    )
    err = LaunchError(f"\n\n-- rank 1 failed first:\n{child_traceback}", 1, 1234)
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
        "p = subprocess.Popen([sys.executable, '-c', 'from worker.files import die_with_parent; import os, time; "
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
