"""Job submission (validation, idempotency, enqueueing), listing, cancel, metrics and artifacts."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest

from gid_core.config import Hyperparameters
from service import crud, jobspec, leases
from service.errors import FieldErrors
from service.models import Dataset, Job, Model
from service.queue import JOB_QUEUE, RUN_JOB_TASK
from service.schemas import JobCreate
from tests.service.helpers import TINY_MODEL


@pytest.fixture
def setup(api):
    """Alice's 2-class train and val datasets and a 2-class teacher; Bob's dataset."""
    ids = {
        "train": api.register_dataset(num_classes=2),
        "val": api.register_dataset(num_classes=2),
        "val3": api.register_dataset(num_classes=3),
        "bob_train": api.register_dataset(num_classes=2, who="bob"),
        "teacher": api.add_model({**TINY_MODEL, "backbone": "resnet50", "fpn_channels": 64}),
    }
    return ids


def train_body(ids, **overrides):
    body = {
        "kind": "train", "name": "t", "student": dict(TINY_MODEL), "train_dataset": ids["train"],
        "val_dataset": ids["val"], "hyperparameters": {"max_iters": 20, "batch_size": 4}, "resources": {"devices": 2},
    }
    return {**body, **overrides}


def distill_body(ids, **overrides):
    return train_body(ids, **{"kind": "distill", "teacher": {"model_id": ids["teacher"]}, **overrides})


def queued_messages(api) -> list[dict]:
    return [json.loads(m) for m in api.redis.client().lrange(JOB_QUEUE, 0, -1)]


def locs(response) -> set[tuple]:
    return {tuple(e["loc"]) for e in response.json()["detail"]}


def test_submit_train_job_is_stored_and_enqueued(api, setup):
    r = api.post("/v1/jobs", json=train_body(setup))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued" and job["attempts"] == 0 and job["kind"] == "train"
    assert job["progress"] == {"iteration": 0, "max_iters": 20, "epoch": None, "eta_seconds": None}
    assert job["train_dataset_id"] == setup["train"] and job["started_at"] is None
    # The message is really in Redis, for the worker's task name and queue.
    assert api.redis.client().llen(JOB_QUEUE) == 1
    (message,) = queued_messages(api)
    assert message["headers"]["task"] == RUN_JOB_TASK and message["headers"]["argsrepr"] == repr([job["id"]])
    # The engine config was resolved at submission, with the dataset's stored paths.
    with api.session() as s:
        row = leases.get_job(s, job_id=job["id"])
        train = s.get(Dataset, setup["train"])
    engine = row.engine_config
    assert engine["data"]["train_annotations"] == train.annotations_path
    assert engine["devices"] == 2 and engine["hyperparameters"]["batch_size"] == 4
    assert engine["student"]["weights"] is None and engine["teacher"] is None
    assert row.config["hyperparameters"]["lr"] == Hyperparameters().lr  # defaults filled in


def test_submit_distill_job_resolves_teacher(api, setup):
    r = api.post("/v1/jobs", json=distill_body(setup))
    assert r.status_code == 201, r.text
    with api.session() as s:
        row = leases.get_job(s, job_id=r.json()["id"])
        teacher = s.get(Model, setup["teacher"])
    assert row.teacher_model_id == teacher.id
    assert row.engine_config["teacher"]["weights"] == teacher.path
    assert row.engine_config["teacher"]["backbone"] == "resnet50"


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda b, i: b["student"].update(arch="yolo"), {("body", "student", "arch")}),
        (lambda b, i: b["student"].update(backbone="vgg16"), {("body", "student", "backbone")}),
        (lambda b, i: b["student"].update(weights="/etc/passwd"), {("body", "student", "weights")}),
        (lambda b, i: b["hyperparameters"].update(lr=-1, warp=1), {("body", "hyperparameters", "lr"), ("body", "hyperparameters", "warp")}),
        (lambda b, i: b.update(train_dataset="nope"), {("body", "train_dataset")}),
        (lambda b, i: b.update(train_dataset=i["bob_train"]), {("body", "train_dataset")}),
        (lambda b, i: b.update(val_dataset="nope"), {("body", "val_dataset")}),
        (lambda b, i: b.update(teacher={"model_id": "nope"}), {("body", "teacher", "model_id")}),
        (lambda b, i: b["student"].update(init_model_id="nope"), {("body", "student", "init_model_id")}),
        (lambda b, i: b["student"].update(num_classes=3), {("body", "student", "num_classes"), ("body", "teacher", "model_id")}),
        (lambda b, i: b.update(val_dataset=i["val3"]), {("body", "val_dataset")}),
        (lambda b, i: b["student"].update(arch="fasterrcnn"), {("body", "teacher", "model_id")}),
        (lambda b, i: b.pop("teacher"), {("body", "teacher")}),
        (lambda b, i: b.update(kind="train"), {("body", "teacher")}),
        (lambda b, i: b["hyperparameters"].update(batch_size=3), {("body", "hyperparameters", "batch_size")}),
        (lambda b, i: b["resources"].update(devices=8), {("body", "resources", "devices"), ("body", "hyperparameters", "batch_size")}),
        (lambda b, i: b["resources"].update(devices=65), {("body", "resources", "devices")}),
        (lambda b, i: b.update(kind="finetune"), {("body", "kind")}),
    ],
    ids=[
        "arch", "backbone", "weights-path", "hyperparameter", "train-missing", "train-other-owner", "val-missing",
        "teacher-missing", "init-missing", "num-classes", "val-categories", "teacher-arch", "distill-no-teacher",
        "train-with-teacher", "batch-not-divisible", "too-many-devices", "devices-schema", "kind",
    ],
)
def test_invalid_job_names_the_fields(api, setup, mutate, expected):
    body = distill_body(setup)
    mutate(body, setup)
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert locs(r) == expected, r.json()
    assert api.get("/v1/jobs").json()["total"] == 0
    assert api.redis.client().llen(JOB_QUEUE) == 0


def test_teacher_categories_must_match_dataset(api, setup):
    teacher = api.add_model(TINY_MODEL, categories=["x", "y"])
    r = api.post("/v1/jobs", json=distill_body(setup, teacher={"model_id": teacher}))
    assert r.status_code == 422 and locs(r) == {("body", "teacher", "model_id")} and "categories" in r.text


def test_init_model_must_fit_student(api, setup):
    init = api.add_model({**TINY_MODEL, "fpn_channels": 32})
    body = train_body(setup)
    body["student"]["init_model_id"] = init
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422 and locs(r) == {("body", "student", "init_model_id")} and "fpn_channels" in r.text
    good = api.add_model(TINY_MODEL)
    body["student"]["init_model_id"] = good
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201
    with api.session() as s:
        assert leases.get_job(s, job_id=r.json()["id"]).engine_config["student"]["weights"] == s.get(Model, good).path


def test_engine_validation_errors_map_to_request_fields():
    """JobConfig's own validators run on the resolved config; their errors name request fields."""
    request = JobCreate.model_validate({
        "kind": "distill", "student": TINY_MODEL, "teacher": {"model_id": "t"}, "train_dataset": "d",
        "hyperparameters": {"batch_size": 3}, "resources": {"devices": 2},
    })
    dataset = Dataset(id="d", annotations_path="/a.json", images_path="/i", categories=["a", "b"])
    teacher = Model(id="t", config={**TINY_MODEL, "num_classes": 3, "arch": "fcos", "fpn_channels": 64}, path="/t.safetensors")
    with pytest.raises(FieldErrors) as info:
        jobspec.build_engine_config(request, train=dataset, val=None, teacher=teacher, init=None)
    arch, classes, batch = info.value.errors  # every problem at once, each at its own field
    assert arch["loc"] == ["body", "teacher", "model_id"] and "teacher.arch (fcos)" in arch["msg"]
    assert classes["loc"] == ["body", "teacher", "model_id"] and "teacher.num_classes (3)" in classes["msg"]
    assert batch["loc"] == ["body", "hyperparameters", "batch_size"]
    teacher.config["num_classes"] = 2
    teacher.config["arch"] = "retinanet"
    with pytest.raises(FieldErrors) as info:
        jobspec.build_engine_config(request, train=dataset, val=None, teacher=teacher, init=None)
    assert info.value.errors[0]["loc"] == ["body", "hyperparameters", "batch_size"]


def test_idempotent_submission(api, setup):
    body = train_body(setup)
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-1"})
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]
    # Explicit defaults are the same request.
    explicit = {**body, "hyperparameters": {**body["hyperparameters"], "lr": Hyperparameters().lr}}
    assert api.post("/v1/jobs", json=explicit, headers={"Idempotency-Key": "k-1"}).status_code == 200
    changed = api.post("/v1/jobs", json={**body, "name": "other"}, headers={"Idempotency-Key": "k-1"})
    assert changed.status_code == 409
    assert api.redis.client().llen(JOB_QUEUE) == 1  # enqueued once
    # Keys are per owner, and requests without a key always create.
    bob_body = {**body, "train_dataset": setup["bob_train"], "val_dataset": None}
    assert api.post("/v1/jobs", "bob", json=bob_body, headers={"Idempotency-Key": "k-1"}).status_code == 201
    assert api.post("/v1/jobs", json=body).json()["id"] != first.json()["id"]
    assert api.get("/v1/jobs").json()["total"] == 2


def test_request_hash_survives_new_fields_with_defaults(api, setup):
    """A field added to the request schema later, at its default, leaves a replay's hash as it was;
    a key stored with the previous hash form (defaults filled in) still replays."""
    from pydantic import Field, create_model

    body = train_body(setup)
    request = JobCreate.model_validate(body)
    later = create_model("LaterJobCreate", __base__=JobCreate, priority=(int, Field(0)))  # a field added later
    assert jobspec.request_hash(later.model_validate(body)) == jobspec.request_hash(request)
    assert jobspec.request_hash(later.model_validate({**body, "priority": 3})) != jobspec.request_hash(request)

    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-legacy"}).json()
    with api.session() as s:  # as a job submitted before this hash form
        s.get(Job, first["id"]).request_hash = jobspec.request_hash(request, with_defaults=True)
        s.commit()
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-legacy"})
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert api.post("/v1/jobs", json={**body, "name": "x"}, headers={"Idempotency-Key": "k-legacy"}).status_code == 409


def test_broker_down_leaves_job_queued_for_the_sweep(api, setup):
    api.configure(redis_url="redis://127.0.0.1:1/0")
    r = api.post("/v1/jobs", json=train_body(setup))
    assert r.status_code == 201 and r.json()["status"] == "queued"
    with api.session() as s:
        assert leases.list_queued_job_ids(s, older_than_seconds=0) == [r.json()["id"]]


def test_list_jobs_paginates_newest_first(api, setup):
    ids = [api.post("/v1/jobs", json=train_body(setup, name=f"j{i}")).json()["id"] for i in range(5)]
    page = api.get("/v1/jobs", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5 and [j["id"] for j in page["items"]] == ids[::-1][1:3]
    api.post(f"/v1/jobs/{ids[0]}/cancel")
    cancelled = api.get("/v1/jobs", params={"status": "cancelled"}).json()
    assert cancelled["total"] == 1 and cancelled["items"][0]["id"] == ids[0]
    assert api.get("/v1/jobs", params={"status": "queued"}).json()["total"] == 4
    assert api.get("/v1/jobs", params={"status": "bogus"}).status_code == 422
    assert api.get("/v1/jobs", params={"limit": 0}).status_code == 422


def test_cancel(api, setup):
    queued = api.post("/v1/jobs", json=train_body(setup)).json()["id"]
    r = api.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled" and r.json()["finished_at"]
    assert api.post(f"/v1/jobs/{queued}/cancel").status_code == 409
    running = api.post("/v1/jobs", json=train_body(setup)).json()["id"]
    with api.session() as s:
        leases.claim_job(s, job_id=running, worker_id="w", lease_seconds=60)
    r = api.post(f"/v1/jobs/{running}/cancel")
    assert r.json()["status"] == "running" and r.json()["cancel_requested"] is True
    with api.session() as s:
        assert leases.renew_lease(s, job_id=running, worker_id="w", lease_seconds=60).cancel_requested
        leases.finish_job(s, job_id=running, worker_id="w", status="cancelled")
    assert api.get(f"/v1/jobs/{running}").json()["status"] == "cancelled"


def test_finished_train_job_feeds_a_distill_job(api, setup):
    """The worker's path: claim, progress, register the output model, finish; then distill from it."""
    job_id = api.post("/v1/jobs", json=train_body(setup)).json()["id"]
    with api.session() as s:
        leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60)
        leases.update_progress(s, job_id=job_id, worker_id="w", progress={"iteration": 20, "max_iters": 20, "epoch": 1.5, "eta_seconds": 0}, latest_metrics={"loss": 0.5})
        model = crud.create_model(
            s, owner_id=api.owner_ids["alice"], name="out", config={**TINY_MODEL, "weights": "x"},
            categories=["class_0", "class_1"], path="/m.safetensors", sha256="f" * 64, size=9, source_job_id=job_id,
        )
        assert leases.finish_job(s, job_id=job_id, worker_id="w", status="succeeded", final_metrics={"AP": 1.0}, output_model_id=model.id)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["output_model_id"] == model.id and job["attempts"] == 1
    assert job["progress"]["epoch"] == 1.5 and job["latest_metrics"] == {"loss": 0.5} and job["final_metrics"] == {"AP": 1.0}
    assert job["started_at"] <= job["finished_at"]
    assert api.get(f"/v1/models/{model.id}").json()["source_job_id"] == job_id
    r = api.post("/v1/jobs", json=distill_body(setup, teacher={"model_id": model.id}))
    assert r.status_code == 201, r.text


def test_metrics_incremental_and_downsampled(api, setup):
    job_id = api.post("/v1/jobs", json=train_body(setup)).json()["id"]
    with api.session() as s:
        leases.add_metric_points(s, job_id=job_id, points=[("loss", step, float(step)) for step in range(1, 101)])
        leases.add_metric_points(s, job_id=job_id, points=[("lr", step, 0.01) for step in range(10, 101, 10)])
        leases.add_metric_points(s, job_id=job_id, points=[("lr", 100, 0.02)])  # re-logged step: newest wins
    url = f"/v1/jobs/{job_id}/metrics"
    full = api.get(url).json()
    assert full["last_step"] == 100 and full["series"]["loss"]["steps"] == list(range(1, 101))
    assert full["series"]["lr"]["values"][-1] == 0.02 and len(full["series"]["lr"]["steps"]) == 10
    newer = api.get(url, params={"names": "loss", "since_step": 95}).json()
    assert list(newer["series"]) == ["loss"] and newer["series"]["loss"]["steps"] == [96, 97, 98, 99, 100]
    assert api.get(url, params={"since_step": 100}).json() == {"job_id": job_id, "series": {}, "last_step": None}
    small = api.get(url, params={"names": "loss,lr", "max_points": 7}).json()["series"]
    loss = small["loss"]
    assert loss["downsampled"] and loss["count"] == 100 and len(loss["steps"]) <= 7
    # Independent computation: buckets of ceil(100 / 7) = 15 steps starting at step 1.
    buckets: dict[int, list[int]] = {}
    for step in range(1, 101):
        buckets.setdefault((step - 1) // 15, []).append(step)
    assert loss["steps"] == [b[-1] for b in buckets.values()]
    assert loss["values"] == pytest.approx([sum(b) / len(b) for b in buckets.values()])
    assert small["lr"]["downsampled"] is True and len(small["lr"]["steps"]) <= 7
    assert api.get(url, params={"max_points": 0}).status_code == 422


def test_artifacts_download(api, setup):
    job_id = api.post("/v1/jobs", json=train_body(setup)).json()["id"]
    out = api.settings.data_dir / "jobs" / job_id / "export"
    out.mkdir(parents=True)
    payload = bytes(range(256)) * 40
    (out / "model.safetensors").write_bytes(payload)
    sha = hashlib.sha256(payload).hexdigest()
    with api.session() as s:
        leases.add_artifact(s, job_id=job_id, name="export/model.safetensors", path=str(out / "model.safetensors"), size=len(payload), sha256=sha)
        leases.add_artifact(s, job_id=job_id, name="gone.json", path=str(out / "gone.json"), size=1, sha256="0" * 64)
    listing = api.get(f"/v1/jobs/{job_id}/artifacts").json()
    assert [(a["name"], a["size"], a["sha256"]) for a in listing] == [
        ("export/model.safetensors", len(payload), sha), ("gone.json", 1, "0" * 64)
    ]
    url = f"/v1/jobs/{job_id}/artifacts/export/model.safetensors"
    full = api.get(url)
    assert full.status_code == 200 and full.content == payload
    assert full.headers["etag"] == f'"{sha}"' and full.headers["content-length"] == str(len(payload))
    assert full.headers["accept-ranges"] == "bytes"
    part = api.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == payload[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(payload)}" and part.headers["content-length"] == "10"
    tail = api.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206 and tail.content == payload[-5:]
    bad = api.get(url, headers={"Range": f"bytes={len(payload) + 10}-"})
    assert bad.status_code == 416 and bad.headers["content-range"] == f"bytes */{len(payload)}"
    for tag in (f'"{sha}"', f'W/"{sha}"', f'"other", "{sha}"', "*"):
        cached = api.get(url, headers={"If-None-Match": tag})
        assert cached.status_code == 304 and cached.content == b"" and cached.headers["etag"] == f'"{sha}"'
    assert api.get(url, headers={"If-None-Match": '"other"'}).status_code == 200
    assert api.get(f"/v1/jobs/{job_id}/artifacts/gone.json").status_code == 404
    assert api.get(f"/v1/jobs/{job_id}/artifacts/nothing").status_code == 404


def test_concurrent_retries_with_one_key_create_one_job(api, setup):
    """Two submissions racing with the same key: the unique (owner, key) index lets one insert win
    and the other returns that job."""
    request = JobCreate.model_validate(train_body(setup))
    barrier = threading.Barrier(2)
    results = []

    def submit() -> None:
        with api.session() as s:
            barrier.wait()
            results.append(jobspec.submit_job(s, owner_id=api.owner_ids["alice"], request=request, idempotency_key="race", settings=api.settings))

    threads = [threading.Thread(target=submit) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and results[0][0].id == results[1][0].id
    assert sorted(created for _, created in results) == [False, True]
    assert api.get("/v1/jobs").json()["total"] == 1
