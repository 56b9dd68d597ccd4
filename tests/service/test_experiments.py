"""``/v1/experiments`` end to end on CPU: a real stack (API, Redis, one Celery worker), tiny
models and budgets. An experiment with a teacher to train creates its GID job only once the
teacher's job succeeded; the comparison table fills in from the jobs' final evaluations."""

from __future__ import annotations

import time

import pytest

from gid import cli

from tests.worker.conftest import api, dataset_ids, stack, tiny_dataset, worker_tmp  # noqa: F401 - fixtures
from tests.worker.helpers import tiny_hyperparameters, tiny_student

pytestmark = pytest.mark.slow
BUDGET = tiny_hyperparameters(max_iters=4, log_period=2, checkpoint_period=4, warmup_iters=1)
TEACHER = tiny_student(fpn_channels=32)


def experiment_body(dataset_ids, teacher: dict, **extra) -> dict:
    return {"name": "exp", "tags": ["t1"], "teacher": teacher, "student": tiny_student(),
            "train_dataset": "tiny-train", "val_dataset": dataset_ids["val"], "hyperparameters": BUDGET, **extra}


def wait_experiment(api, experiment_id: str, statuses: set[str], timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while (exp := api.get(f"/v1/experiments/{experiment_id}"))["status"] not in statuses:
        assert time.monotonic() < deadline, f"experiment not {statuses} in {timeout} s: {exp}"
        time.sleep(0.3)
    return exp


def test_refused_experiment_names_fields_and_creates_nothing(api, dataset_ids):
    before = api.get("/v1/jobs")["total"]
    body = experiment_body(dataset_ids, {"train": {"model": tiny_student(num_classes=7)}}, val_dataset="nope")
    r = api.http.post("/v1/experiments", json=body)
    assert r.status_code == 422, r.text
    locs = {tuple(e["loc"]) for e in r.json()["detail"]}
    assert ("body", "val_dataset") in locs
    assert any(loc[:4] == ("body", "teacher", "train", "model") for loc in locs), locs
    r = api.http.post("/v1/experiments", json=experiment_body(dataset_ids, {"model_id": "x", "weights": "y"}))
    assert r.status_code == 422 and "exactly one" in r.text
    assert api.get("/v1/jobs")["total"] == before


def test_experiment_trains_teacher_then_compares(api, dataset_ids, capsys):
    exp = api.post("/v1/experiments", json=experiment_body(dataset_ids, {"train": {"model": TEACHER}}))
    assert exp["status"] == "waiting_teacher" and exp["jobs"]["gid"] is None
    teacher_job = api.job(exp["jobs"]["teacher"])
    assert teacher_job["kind"] == "train" and teacher_job["name"] == "exp-teacher"
    assert f"experiment:{exp['id'][:8]}" in teacher_job["tags"] and "t1" in teacher_job["tags"]
    assert teacher_job["train_dataset_id"] == dataset_ids["train"]  # the name was resolved

    done = wait_experiment(api, exp["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    gid = api.job(done["jobs"]["gid"])
    baseline = api.job(done["jobs"]["baseline"])
    assert gid["kind"] == "distill" and gid["teacher_model_id"] == api.job(done["jobs"]["teacher"])["output_model_id"]
    assert gid["config"]["hyperparameters"] == baseline["config"]["hyperparameters"]  # one budget
    rows = {row["role"]: row for row in done["table"]}
    assert list(rows) == ["teacher", "baseline", "gid"]
    for row in rows.values():
        assert row["status"] == "succeeded" and row["seconds"] > 0 and row["model_id"]
        assert all(isinstance(row[k], float) for k in ("AP", "AP50", "AP75")), row
        assert all(row[k] is None or isinstance(row[k], float) for k in ("APs", "APm", "APl")), row  # None: no such boxes
    assert rows["teacher"]["params"] > rows["baseline"]["params"] == rows["gid"]["params"] > 0
    assert done["links"]["gid"] == f"/v1/jobs/{gid['id']}"
    listed = api.get("/v1/experiments")
    assert exp["id"] in [e["id"] for e in listed["items"]]
    assert cli.main(["experiments", "show", exp["id"], "--url", api.stack.url, "--token", api.stack.token]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].endswith("succeeded") and [line.split()[0] for line in shown[-3:]] == ["teacher", "baseline", "gid"]

    # a trained teacher by model id: both jobs at once; its metrics come from its own job
    teacher_model = rows["teacher"]["model_id"]
    again = api.post("/v1/experiments", json=experiment_body(dataset_ids, {"model_id": teacher_model[:8]}))
    assert again["jobs"]["gid"] and again["jobs"]["baseline"] and again["jobs"]["teacher"] is None
    first = {row["role"]: row for row in again["table"]}["teacher"]
    assert first["AP"] == rows["teacher"]["AP"] and first["model_id"] == teacher_model
    for job_id in (again["jobs"]["gid"], again["jobs"]["baseline"]):
        api.post(f"/v1/jobs/{job_id}/cancel", expect=200)
    assert api.get(f"/v1/experiments/{again['id']}")["status"] == "failed"  # cancelled jobs
