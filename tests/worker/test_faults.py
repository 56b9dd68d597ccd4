"""The fault suite: what users of other job services complain of most, each fault injected by
killing or breaking the real process (the session's real Redis, API and Celery worker).

1. A job stuck ``running`` after its worker crashed: SIGKILL the worker; the reaper requeues the
   job when its lease expires and it finishes (``test_job_of_a_killed_worker_is_requeued_and_finishes``).
2. A worker known dead (``gid up`` saw it die) does not wait for the lease: its job is requeued at
   once and runs before a job submitted after it (``test_dead_worker_is_restarted_and_its_job_keeps_its_place``).
3. A resume that restarts from zero: SIGKILL the training child (the OOM killer's way); the job is
   retried by its worker from the checkpoint iteration, the cause recorded
   (``test_killed_training_child_resumes_from_the_checkpoint``); the same for one DDP rank
   (``test_killed_ddp_rank_resumes_from_the_checkpoint``).
4. A deterministic failure is not retried: a non-finite loss fails once (``test_non_finite_loss_fails_once``;
   a dataset problem: ``test_lifecycle.test_failure_is_reported_with_the_exception_and_log``).
5. A duplicate submission: the same Idempotency-Key posted concurrently makes one job
   (``test_concurrent_duplicate_submissions_make_one_job``).
6. A truncated download: the connection is dropped mid-download; ``gid download`` resumes with a
   Range request and the sha256 matches (``test_truncated_download_resumes_with_range``).
7. A long job redelivered by the broker: a second delivery of the task message while the job's
   lease is alive does not run a second copy (``test_redelivered_message_does_not_run_a_second_copy``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis

from gid_core.jobdir import JobDir
from service import leases
from service.core.db import session_scope
from service.queue import enqueue_job
from tests.worker.helpers import (
    LEASE_SECONDS,
    ghost_job,
    job_body,
    processes_in,
    training_processes,
    wait_until,
)

pytestmark = pytest.mark.slow


def submit_and_wait_for_checkpoint(api, stack, dataset_ids, *, name: str, devices: int = 1,
                                   max_iters: int = 24) -> tuple[dict, Path]:
    job = api.post("/v1/jobs", json=job_body("train", dataset_ids, name=name, devices=devices, max_iters=max_iters,
                                              checkpoint_period=4))
    output_dir = stack.data_dir / "jobs" / job["id"]
    wait_until(lambda: JobDir(output_dir).checkpoint_iteration(), 180, "a checkpoint")
    return job, output_dir


def causes(job: dict) -> list[str | None]:
    return [a["cause"] for a in job["attempt_history"]]


def assert_iterations_unique(output_dir: Path, max_iters: int) -> None:
    """The training log was trimmed back to the checkpoint on resume: no iteration twice."""
    iterations = [json.loads(line)["iteration"] for line in JobDir(output_dir).train_log.read_text().splitlines()
                  if line.strip() and "iteration" in json.loads(line)]
    assert iterations == sorted(set(iterations)) and iterations[-1] == max_iters, iterations


# --------------------------------------------------------------------------- worker crashes


def test_job_of_a_killed_worker_is_requeued_and_finishes(stack, api, dataset_ids):
    job, output_dir = submit_and_wait_for_checkpoint(api, stack, dataset_ids, name="resumable")
    api.wait_for(job["id"], lambda j: j["progress"].get("iteration", 0) >= 9, 120, "iteration 9")

    # SIGKILL the Celery worker and its pool process; the training tree dies with them.
    stack.stop_worker(kill=True)
    killed_at = time.monotonic()
    while processes_in(output_dir):
        assert time.monotonic() - killed_at < 10, f"orphans: {processes_in(output_dir)}"
        time.sleep(0.2)
    stalled = api.job(job["id"])
    assert stalled["status"] == "running" and stalled["attempts"] == 1
    time.sleep(1.5)
    assert api.job(job["id"])["progress"]["iteration"] == stalled["progress"]["iteration"]  # nothing trains

    # A new worker: after the lease expires its reaper requeues the job, which resumes.
    stack.start_worker()
    resumed = api.wait_for(job["id"], lambda j: j["progress"].get("attempt") == 2, LEASE_SECONDS + 60,
                           "the second attempt")
    assert resumed["progress"]["start_iteration"] >= 8  # the newest checkpoint before the kill
    done = api.wait_terminal(job["id"], timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and done["progress"]["iteration"] == 24
    assert causes(done) == ["worker lost (its lease expired)", "succeeded"]
    assert "resumed from checkpoint at iteration" in (output_dir / "logs" / "attempt-2.log").read_text()
    names = {a["name"] for a in api.get(f"/v1/jobs/{job['id']}/artifacts")}
    assert {"model.safetensors", "attempt-2.log"} <= names


def test_dead_worker_is_restarted_and_its_job_keeps_its_place(stack, api, dataset_ids):
    first, output_dir = submit_and_wait_for_checkpoint(api, stack, dataset_ids, name="first")
    later = api.post("/v1/jobs", json=job_body("train", dataset_ids, name="later", max_iters=4))

    # The worker dies for real (SIGKILL, its whole process group); `gid up` heals the stack.
    os.killpg(stack.children["worker"].process.pid, signal.SIGKILL)
    wait_until(lambda: not stack.children["worker"].alive(), 10, "the worker's death")
    requeued_at = time.monotonic()
    assert any(m.startswith("worker exited") for m in stack.heal())
    assert stack.children["worker"].alive()

    done = api.wait_terminal(first["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    # Requeued because the worker was known dead, not because its lease ran out.
    assert causes(done) == ["worker died", "succeeded"]
    assert done["attempt_history"][1]["started_at"] > done["attempt_history"][0]["ended_at"]
    assert time.monotonic() - requeued_at < 180
    # Its new message was behind the later job's, yet it ran first: submission order holds.
    later = api.wait_terminal(later["id"], timeout=120)
    assert later["status"] == "succeeded", later["error"]
    assert later["started_at"] >= done["finished_at"], (later["started_at"], done["finished_at"])


# --------------------------------------------------------------------------- training crashes


def test_killed_training_child_resumes_from_the_checkpoint(stack, api, dataset_ids):
    job, output_dir = submit_and_wait_for_checkpoint(api, stack, dataset_ids, name="oom-child")
    (runner,) = wait_until(lambda: training_processes(output_dir)["runner"], 30, "the training child")
    checkpoint = JobDir(output_dir).checkpoint_iteration()
    os.kill(runner, signal.SIGKILL)  # as the OOM killer does

    done = api.wait_terminal(job["id"], timeout=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert causes(done) == ["training process killed by signal SIGKILL", "succeeded"]
    # Not from zero: the second attempt started at (at least) the checkpoint that existed at the kill.
    attempt_2 = (output_dir / "logs" / "attempt-2.log").read_text()
    assert "resumed from checkpoint at iteration" in attempt_2
    assert done["progress"]["start_iteration"] >= checkpoint > 0
    assert_iterations_unique(output_dir, 24)


def test_killed_ddp_rank_resumes_from_the_checkpoint(stack, api, dataset_ids):
    job, output_dir = submit_and_wait_for_checkpoint(api, stack, dataset_ids, name="oom-rank", devices=2,
                                                     max_iters=16)
    ranks = wait_until(lambda: training_processes(output_dir)["ranks"], 30, "the DDP ranks")
    checkpoint = JobDir(output_dir).checkpoint_iteration()
    os.kill(max(ranks), signal.SIGKILL)  # one rank only

    done = api.wait_terminal(job["id"], timeout=240)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2 and causes(done)[1] == "succeeded"
    assert causes(done)[0] and "succeeded" not in causes(done)[0]
    assert done["progress"]["start_iteration"] >= checkpoint > 0
    assert_iterations_unique(output_dir, 16)


def test_non_finite_loss_fails_once(stack, api, dataset_ids):
    job = api.post("/v1/jobs", json=job_body("train", dataset_ids, name="diverges", lr=1e12, warmup_iters=0,
                                              max_iters=40))
    done = api.wait_terminal(job["id"], timeout=120)
    assert done["status"] == "failed"
    assert done["error"].startswith("FloatingPointError: non-finite loss"), done["error"]
    assert done["attempts"] == 1 and causes(done) == [done["error"]]


# --------------------------------------------------------------------------- the API side


def test_concurrent_duplicate_submissions_make_one_job(stack, api, dataset_ids):
    body = job_body("train", dataset_ids, name="twice", max_iters=4)
    headers = {"Authorization": f"Bearer {stack.token}", "Idempotency-Key": f"dup-{time.time_ns()}"}

    def post(_: int) -> httpx.Response:
        with httpx.Client(base_url=stack.url, headers=headers, timeout=60) as client:
            return client.post("/v1/jobs", json=body)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(post, range(8)))
    assert sorted({r.status_code for r in responses}) in ([201], [200, 201]), [r.text for r in responses]
    assert sum(r.status_code == 201 for r in responses) == 1
    assert len({r.json()["id"] for r in responses}) == 1
    jobs = api.get("/v1/jobs", params={"limit": 200})["items"]
    assert sum(j["name"] == "twice" for j in jobs) == 1
    assert api.wait_terminal(responses[0].json()["id"], timeout=120)["status"] == "succeeded"


class CuttingProxy:
    """A TCP proxy to the API that drops the first full download after ``cut_after`` response
    bytes (a connection lost mid-way) and records each request's head."""

    def __init__(self, upstream_port: int, cut_after: int) -> None:
        self.upstream_port, self.cut_after = upstream_port, cut_after
        self.heads: list[str] = []
        self.cuts = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            text = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
            self.heads.append(text)
            # One request per connection, so that each download is a connection of its own.
            upstream.sendall(head.replace(b"\r\n", b"\r\nConnection: close\r\n", 1))
            cut = "/download" in text.split("\r\n", 1)[0] and "range:" not in text and self.cuts == 0
            self.cuts += cut
            sent = 0
            while data := upstream.recv(65536):
                if cut and sent + len(data) > self.cut_after:
                    client.sendall(data[: self.cut_after - sent])
                    client.shutdown(socket.SHUT_RDWR)  # dropped mid-download
                    return
                client.sendall(data)
                sent += len(data)

    def close(self) -> None:
        self.server.close()


def test_truncated_download_resumes_with_range(stack, api, dataset_ids, tmp_path: Path):
    job = api.post("/v1/jobs", json=job_body("train", dataset_ids, name="to-download", max_iters=4))
    done = api.wait_terminal(job["id"], timeout=120)
    model = api.get(f"/v1/models/{done['output_model_id']}")
    assert model["size"] > 2 << 20
    proxy = CuttingProxy(int(stack.url.rsplit(":", 1)[1]), cut_after=1 << 20)
    try:
        out = tmp_path / "student.safetensors"
        env = {**os.environ, "GID_URL": f"http://127.0.0.1:{proxy.port}", "GID_TOKEN": stack.token}
        run = subprocess.run([sys.executable, "-m", "gid", "download", job["id"], "-o", str(out)], env=env,
                             capture_output=True, text=True, timeout=120)
    finally:
        proxy.close()
    assert run.returncode == 0, run.stderr
    assert proxy.cuts == 1
    ranged = [h for h in proxy.heads if "range: bytes=" in h]
    assert ranged and f'if-range: "{model["sha256"]}"' in ranged[0], "\n\n".join(proxy.heads)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == model["sha256"]
    assert out.stat().st_size == model["size"]


# --------------------------------------------------------------------------- the broker side


def test_redelivered_message_does_not_run_a_second_copy(stack, api, db, dataset_ids, tiny_dataset):
    job_id = ghost_job(db, dataset_ids, tiny_dataset, max_iters=4)
    client = redis.Redis.from_url(stack.redis_url)
    worker_log = stack.logs_dir / "worker.log"
    log_offset = worker_log.stat().st_size
    # (A worker killed by an earlier test leaves its message unacknowledged until the visibility timeout.)
    unacked_before = client.hlen("unacked")

    # A (re)delivered message while the ghost's lease is alive: the worker drops and acknowledges it.
    assert enqueue_job(job_id, broker_url=stack.redis_url)
    deadline = time.monotonic() + 30
    while f"job {job_id} not claimable" not in worker_log.read_text()[log_offset:]:
        assert time.monotonic() < deadline, worker_log.read_text()[log_offset:]
        time.sleep(0.2)
    time.sleep(0.5)
    job = api.job(job_id)
    assert job["status"] == "running" and job["attempts"] == 1
    assert processes_in(stack.data_dir / "jobs" / job_id) == []  # no second copy trains
    with session_scope(db) as s:
        assert leases.get_job(s, job_id=job_id).lease_owner == "ghost"
    assert client.llen("gid.jobs") == 0 and client.hlen("unacked") == unacked_before  # consumed and acknowledged

    # The ghost dies: its lease runs out, the worker's reaper requeues the job and the worker runs it.
    with session_scope(db) as s:
        assert leases.renew_lease(s, job_id=job_id, worker_id="ghost", lease_seconds=-1).alive
    done = api.wait_terminal(job_id, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert f"job {job_id} requeued (worker lost)" in worker_log.read_text()[log_offset:]
