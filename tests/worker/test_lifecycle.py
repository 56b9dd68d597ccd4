"""Job lifecycle with the real worker process: cancel, failure, the reaper, a lost lease.
(Crashes, resumes and redelivered messages: the fault suite, ``test_faults.py``.)"""

from __future__ import annotations

import shutil
import time

import pytest
from sqlalchemy import update

from service import leases
from service.core.db import session_scope
from service.models import Job
from tests.worker.helpers import ghost_job, job_body, processes_in

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
    # One line, the exception type and message, without the data directory's path.
    error = done["error"]
    assert "\n" not in error and str(stack.data_dir) not in error, error
    assert error.startswith("DatasetValidationError: ") and "images folder" in error and "not found" in error, error
    # A dataset problem is deterministic: not retried.
    assert done["attempts"] == 1 and [a["number"] for a in done["attempt_history"]] == [1]
    assert done["attempt_history"][0]["cause"] == error and done["attempt_history"][0]["ended_at"]
    # The traceback stays in the attempt's log, an artifact of the job.
    log = api.http.get(f"/v1/jobs/{job['id']}/artifacts/attempt-1.log")
    assert log.status_code == 200 and "Traceback" in log.text and "engine.py" in log.text


def test_reaper_fails_a_job_after_max_attempts(stack, api, db, dataset_ids, tiny_dataset):
    job_id = ghost_job(db, dataset_ids, tiny_dataset, max_iters=4)
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
