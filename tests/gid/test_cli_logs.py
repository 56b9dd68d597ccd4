"""``gid logs [-f] [-n N] JOB`` and ``gid wait`` over real HTTP (uvicorn) against the real app; the
job is driven through the lease protocol the worker runs, its log written where the worker writes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gid_core.jobdir import JobDir
from service import leases
from tests.service.conftest import api, db_url, pg_database, pg_server, redis_server, settings  # noqa: F401
from tests.service.test_events import live, run_like_the_worker, submit  # noqa: F401

pytestmark = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)


def gid_env(api, url: str) -> dict[str, str]:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("GID_")}
    return {**base, "GID_URL": url, "GID_TOKEN": api.tokens["alice"]}


def test_gid_logs_tail_and_follow(api, live, tmp_path):  # noqa: F811
    job_id = submit(api)
    with api.session() as s:
        leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60)
    log = JobDir(api.settings.data_dir / "jobs" / job_id).attempt_log(1)
    log.parent.mkdir(parents=True)
    log.write_text("".join(f"iter {i}\n" for i in range(5)))
    env = gid_env(api, live)

    out = subprocess.run([sys.executable, "-m", "gid", "logs", "-n", "2", job_id], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "iter 3\niter 4\n"

    follower = subprocess.Popen([sys.executable, "-m", "gid", "logs", "-f", "-n", "1", job_id], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert follower.stdout.readline() == "iter 4\n"
        with open(log, "a") as f:
            f.write("iter 5\n")
        assert follower.stdout.readline() == "iter 5\n"  # printed while the job runs
        with api.session() as s:
            leases.finish_job(s, job_id=job_id, worker_id="w", status="succeeded")
        assert follower.wait(timeout=30) == 0  # ends with the job
    finally:
        follower.kill()
        follower.communicate()

    out = subprocess.run([sys.executable, "-m", "gid", "logs", "no-such-job"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "HTTP 404" in out.stderr


def test_gid_wait_follows_the_event_stream(api, live):  # noqa: F811
    job_id = submit(api)
    # --interval 600: only the event stream can make this return in time.
    waiter = subprocess.Popen([sys.executable, "-m", "gid", "wait", "--interval", "600", job_id],
                              env=gid_env(api, live), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert ": queued" in waiter.stderr.readline()  # it has read the job: now it listens to events
        run_like_the_worker(api, job_id)
        assert waiter.wait(timeout=60) == 0
    finally:
        waiter.kill()
        _, err = waiter.communicate()
    assert f"job {job_id} succeeded" in err
