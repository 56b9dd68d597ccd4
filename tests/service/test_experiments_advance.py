"""An experiment whose teacher is trained in it: the GID job appears only after the teacher's job
succeeded, made by the reaper's sweep or by reading the experiment, once; a failed teacher
ends the experiment. The worker is played in-process (``finish_like_the_worker``)."""

from __future__ import annotations

import pytest

from service import crud, leases
from tests.service.helpers import TINY_MODEL, finish_like_the_worker
from worker.reaper import reap

HP = {"max_iters": 2, "batch_size": 1, "num_workers": 0}


@pytest.fixture
def experiment(api) -> dict:
    train, val = api.register_dataset(), api.register_dataset()
    body = {"teacher": {"train": {"model": {**TINY_MODEL, "fpn_channels": 32}}}, "student": dict(TINY_MODEL),
            "train_dataset": train, "val_dataset": val, "hyperparameters": HP}
    r = api.post("/v1/experiments", json=body)
    assert r.status_code == 201, r.text
    exp = r.json()
    assert exp["status"] == "waiting_teacher" and exp["jobs"]["gid"] is None and len(exp["table"]) == 3
    return exp


def test_sweep_creates_the_gid_job_once_the_teacher_succeeded(api, experiment):
    sent: list[str] = []
    with api.session() as s:
        assert reap(s, requeue_after_seconds=3600, enqueue=lambda _id: True).released == []
    teacher_model = finish_like_the_worker(api, experiment["jobs"]["teacher"])
    with api.session() as s:
        report = reap(s, requeue_after_seconds=3600, enqueue=lambda job_id: sent.append(job_id) or True)
        assert len(report.released) == 1 and sent == report.released
        assert reap(s, requeue_after_seconds=3600, enqueue=lambda _id: True).released == []  # only once
    exp = api.get(f"/v1/experiments/{experiment['id']}").json()
    assert exp["jobs"]["gid"] == report.released[0] and exp["status"] == "running"
    gid = api.get(f"/v1/jobs/{exp['jobs']['gid']}").json()
    assert gid["kind"] == "distill" and gid["teacher_model_id"] == teacher_model and gid["status"] == "queued"


def test_reading_the_experiment_creates_the_gid_job(api, experiment):
    finish_like_the_worker(api, experiment["jobs"]["teacher"])
    first = api.get(f"/v1/experiments/{experiment['id']}").json()
    assert first["jobs"]["gid"] is not None
    assert api.get("/v1/experiments").json()["items"][0]["jobs"]["gid"] == first["jobs"]["gid"]
    queued = api.get("/v1/jobs", params={"kind": "distill"}).json()
    assert queued["total"] == 1


def test_a_failed_teacher_ends_the_experiment(api, experiment):
    teacher = experiment["jobs"]["teacher"]
    with api.session() as s:
        assert leases.claim_job(s, job_id=teacher, worker_id="w", lease_seconds=60) is not None
        assert leases.finish_job(s, job_id=teacher, worker_id="w", status="failed", error="boom")
        s.commit()
    exp = api.get(f"/v1/experiments/{experiment['id']}").json()
    assert exp["status"] == "failed" and teacher in exp["error"] and exp["jobs"]["gid"] is None
    with api.session() as s:
        assert crud.list_jobs(s, owner_id=api.owner_ids["alice"], kind="distill")[1] == 0


def test_experiments_are_private(api, experiment):
    assert api.get(f"/v1/experiments/{experiment['id']}", who="bob").status_code == 404
    assert api.get("/v1/experiments", who="bob").json()["total"] == 0
