"""Job lifecycle with the real worker process: cancel, failure, redelivered messages, the reaper,
and resuming after the worker was killed mid-job."""

from __future__ import annotations

import shutil
import time
import pytest
import redis
from sqlalchemy import update

from gid.embedded import LOCAL_OWNER
from gid_core.config import JobConfig
from service import crud, leases
from service.core.db import session_scope
from service.models import Job
from service.queue import enqueue_job
from tests.worker.helpers import LEASE_SECONDS, job_body, processes_in, tiny_hyperparameters, tiny_student

pytestmark = pytest.mark.slow


def test_cancel_running_job_stops_within_seconds(stack, api, dataset_ids):
    job = api.post("/v1/jobs", json=job_body("train", dataset_ids, name="to-cancel", max_iters=2000,
                                              checkpoint_period=1000))
    api.wait_for(job["id"], lambda j: j["progress"].get("iteration", 0) >= 2, 120, "iteration 2")
    api.post(f"/v1/jobs/{job['id']}/cancel", expect=200)
    start = time.monotonic()
    done = api.wait_terminal(job["id"], timeout=30)
    elapsed = time.monotonic() - start
    assert done["status"] == "cancelled", done
    assert elapsed < 10, f"cancellation took {elapsed:.1f} s"
    assert done["progress"]["iteration"] < 2000 and done["output_model_id"] is None
    # Training stopped through the cancel flag: the trainer checkpointed where it stopped.
    names = {a["name"] for a in api.get(f"/v1/jobs/{job['id']}/artifacts")}
    assert {"checkpoint.pt", "attempt-1.log"} <= names
    output_dir = stack.data_dir / "jobs" / job["id"]
    deadline = time.monotonic() + 10
    while processes_in(output_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_in(output_dir) == []


def test_failure_is_reported_with_the_exception_and_log(stack, api, tiny_dataset, worker_tmp):
    # A dataset that disappears after registration: the engine cannot read it.
    copy = stack.data_dir / "doomed"
    shutil.copytree(tiny_dataset["output_dir"], copy)
    ds = api.post("/v1/datasets", json={"name": "doomed", "annotations": str(copy / "train" / "annotations.json"),
                                        "images": str(copy / "train" / "images")})
    shutil.rmtree(copy / "train" / "images")
    job = api.post("/v1/jobs", json=job_body("train", {"train": ds["id"], "val": ds["id"]}, name="doomed"))
    done = api.wait_terminal(job["id"], timeout=120)
    assert done["status"] == "failed"
    head, _, log_tail = done["error"].partition("last lines of attempt-1.log:")
    assert head.startswith("DatasetValidationError: ") and "images folder" in head and "not found" in head, head
    assert "Traceback" in log_tail and "engine.py" in log_tail


def _ghost_job(stack, api, db, dataset_ids, tiny_dataset, *, max_iters: int) -> str:
    """A valid job inserted straight into the database (no message sent), then leased by a
    "ghost" worker that never runs it."""
    engine = JobConfig(
        kind="train", student=tiny_student(),
        data={"train_annotations": tiny_dataset["train_annotations"], "train_images": tiny_dataset["train_images"]},
        hyperparameters=tiny_hyperparameters(max_iters=max_iters), devices=1,
    )
    with session_scope(db) as s:
        owner = crud.get_or_create_owner(s, name=LOCAL_OWNER)
        job, _ = crud.create_job(
            s, owner_id=owner.id, kind="train", name="ghost", config={}, engine_config=engine.model_dump(mode="json"),
            request_hash="0" * 64, idempotency_key=None, train_dataset_id=dataset_ids["train"],
        )
        claimed = leases.claim_job(s, job_id=job.id, worker_id="ghost", lease_seconds=600)
        assert claimed is not None
        return job.id


def test_redelivered_message_for_a_leased_job_is_dropped_then_reaper_requeues(stack, api, db, dataset_ids,
                                                                              tiny_dataset):
    job_id = _ghost_job(stack, api, db, dataset_ids, tiny_dataset, max_iters=4)
    client = redis.Redis.from_url(stack.redis_url)
    worker_log = stack.logs_dir / "worker.log"
    log_offset = worker_log.stat().st_size

    # A (re)delivered message while the ghost's lease is alive: the worker drops and acknowledges it.
    assert enqueue_job(job_id, broker_url=stack.redis_url)
    deadline = time.monotonic() + 30
    while f"job {job_id} not claimable" not in worker_log.read_text()[log_offset:]:
        assert time.monotonic() < deadline, worker_log.read_text()[log_offset:]
        time.sleep(0.2)
    time.sleep(0.5)
    job = api.job(job_id)
    assert job["status"] == "running" and job["attempts"] == 1
    with session_scope(db) as s:
        assert leases.get_job(s, job_id=job_id).lease_owner == "ghost"
    assert client.llen("gid.jobs") == 0 and client.hlen("unacked") == 0  # consumed and acknowledged

    # The ghost dies: its lease runs out, the worker's reaper requeues the job and the worker runs it.
    with session_scope(db) as s:
        assert leases.renew_lease(s, job_id=job_id, worker_id="ghost", lease_seconds=-1).alive
    done = api.wait_terminal(job_id, timeout=120)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempts"] == 2
    assert f"job {job_id} requeued (worker lost)" in worker_log.read_text()[log_offset:]


def test_resume_after_worker_killed_mid_job(stack, api, dataset_ids):
    job = api.post("/v1/jobs", json=job_body("train", dataset_ids, name="resumable", max_iters=24,
                                              checkpoint_period=4))
    output_dir = stack.data_dir / "jobs" / job["id"]
    api.wait_for(job["id"], lambda j: j["progress"].get("iteration", 0) >= 9, 120, "iteration 9")
    assert (output_dir / "checkpoints" / "last").is_file()

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
    assert "resumed from checkpoint at iteration" in (output_dir / "logs" / "attempt-2.log").read_text()
    names = {a["name"] for a in api.get(f"/v1/jobs/{job['id']}/artifacts")}
    assert {"model.safetensors", "attempt-2.log"} <= names


def test_reaper_fails_a_job_after_max_attempts(stack, api, db, dataset_ids, tiny_dataset):
    job_id = _ghost_job(stack, api, db, dataset_ids, tiny_dataset, max_iters=4)
    with session_scope(db) as s:  # as if two earlier workers had been lost (GID_MAX_ATTEMPTS is 3)
        s.execute(update(Job).where(Job.id == job_id).values(attempts=3))
        s.commit()
        assert leases.renew_lease(s, job_id=job_id, worker_id="ghost", lease_seconds=-1).alive  # the ghost dies
    done = api.wait_terminal(job_id, timeout=30)  # the worker's reaper sweeps every second
    assert done["status"] == "failed" and done["error"] == "worker lost 3 times"
    assert done["attempts"] == 3


def test_lost_lease_stops_training_without_touching_the_job(stack, api, db, dataset_ids):
    job = api.post("/v1/jobs", json=job_body("train", dataset_ids, name="stolen", max_iters=2000,
                                              checkpoint_period=1000))
    output_dir = stack.data_dir / "jobs" / job["id"]
    api.wait_for(job["id"], lambda j: j["progress"].get("iteration", 0) >= 2, 120, "iteration 2")
    with session_scope(db) as s:  # another worker took the job over (as after a requeue)
        s.execute(update(Job).where(Job.id == job["id"]).values(lease_owner="thief"))
        s.commit()
    stopped_at = time.monotonic()
    while processes_in(output_dir):
        assert time.monotonic() - stopped_at < 20, "training kept running after the lease was lost"
        time.sleep(0.2)
    time.sleep(1.5)  # the supervisor must not record an outcome for a job it no longer holds
    current = api.job(job["id"])
    assert current["status"] == "running" and current["error"] is None
    with session_scope(db) as s:
        assert leases.get_job(s, job_id=job["id"]).lease_owner == "thief"
        assert leases.finish_job(s, job_id=job["id"], worker_id="thief", status="cancelled")
    assert "lease lost" in (stack.logs_dir / "worker.log").read_text()
