"""DELETE of jobs (finished only), models and datasets (409 while a queued or running job uses
them): the files are freed, finished jobs keep their history, a job's output model survives it."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from sqlalchemy import func, select, update

from service import leases
from service.models import Artifact, Dataset, Model
from tests.service.helpers import TINY_MODEL, finish_like_the_worker, write_coco


def train_body(dataset_id: str, **extra) -> dict:
    return {"kind": "train", "student": dict(TINY_MODEL), "train_dataset": dataset_id,
            "hyperparameters": {"max_iters": 2, "batch_size": 1}, **extra}


def submit(api, body) -> str:
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def delete(api, url: str, who: str = "alice"):
    return api.client.delete(url, headers=api.auth(who))


def stored_model(api, size: int = 500) -> tuple[str, Path]:
    """An uploaded model as the store keeps it: ``models/<id>.safetensors`` and its row."""
    model_id = api.add_model({**TINY_MODEL, "backbone": "resnet50", "fpn_channels": 64})
    path = api.settings.data_dir / "models" / f"{model_id}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"m" * size)
    with api.session() as s:
        s.execute(update(Model).where(Model.id == model_id).values(path=str(path), size=size))
        s.commit()
    return model_id, path


def upload_dataset(api, tmp_path: Path) -> str:
    folder = tmp_path / "upload-src"
    ann = write_coco(folder)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for image in sorted((folder / "images").iterdir()):
            zf.write(image, image.name)
    files = {"annotations": ("a.json", ann.read_bytes()), "images": ("i.zip", buf.getvalue())}
    r = api.post("/v1/datasets", data={"name": "up"}, files=files)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_delete_job_only_when_finished_frees_its_folder_and_keeps_its_model(api):
    job_id = submit(api, train_body(api.register_dataset()))
    assert delete(api, f"/v1/jobs/{job_id}").status_code == 409  # queued
    model_id = finish_like_the_worker(api, job_id)
    job_dir = api.settings.data_dir / "jobs" / job_id
    weights = (job_dir / "export" / "model.safetensors").read_bytes()
    assert delete(api, f"/v1/jobs/{job_id}", who="bob").status_code == 404  # not bob's

    assert delete(api, f"/v1/jobs/{job_id}").status_code == 204
    assert api.get(f"/v1/jobs/{job_id}").status_code == 404
    assert not job_dir.exists()
    with api.session() as s:
        assert s.scalar(select(func.count()).select_from(Artifact).where(Artifact.job_id == job_id)) == 0
    model = api.get(f"/v1/models/{model_id}")
    assert model.status_code == 200 and model.json()["source_job_id"] is None
    download = api.get(f"/v1/models/{model_id}/download")
    assert download.status_code == 200 and download.content == weights
    assert hashlib.sha256(download.content).hexdigest() == model.json()["sha256"]
    assert delete(api, f"/v1/jobs/{job_id}").status_code == 404  # already gone


def test_delete_running_job_is_409(api):
    job_id = submit(api, train_body(api.register_dataset()))
    with api.session() as s:
        assert leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60) is not None
    r = delete(api, f"/v1/jobs/{job_id}")
    assert r.status_code == 409 and "running" in r.json()["detail"]
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"


def test_delete_model_refused_while_a_job_needs_it_then_file_freed(api):
    dataset = api.register_dataset()
    teacher, path = stored_model(api)
    job_id = submit(api, train_body(dataset, kind="distill", teacher={"model_id": teacher}))
    r = delete(api, f"/v1/models/{teacher}")
    assert r.status_code == 409 and job_id in r.json()["detail"]
    assert path.is_file()
    assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200  # queued -> cancelled

    assert delete(api, f"/v1/models/{teacher}", who="bob").status_code == 404
    assert delete(api, f"/v1/models/{teacher}").status_code == 204
    assert not path.exists()
    assert api.get(f"/v1/models/{teacher}").status_code == 404
    assert teacher not in {m["id"] for m in api.get("/v1/models").json()["items"]}
    # The finished job keeps its history; a new job cannot use the deleted model.
    assert api.get(f"/v1/jobs/{job_id}").json()["teacher_model_id"] == teacher
    r = api.post("/v1/jobs", json=train_body(dataset, kind="distill", teacher={"model_id": teacher}))
    assert r.status_code == 422 and ["body", "teacher", "model_id"] in [e["loc"] for e in r.json()["detail"]]


def test_delete_output_model_drops_the_jobs_weights_artifact(api):
    job_id = submit(api, train_body(api.register_dataset()))
    model_id = finish_like_the_worker(api, job_id)
    weights = api.settings.data_dir / "jobs" / job_id / "export" / "model.safetensors"
    assert delete(api, f"/v1/models/{model_id}").status_code == 204
    assert not weights.exists()
    names = {a["name"] for a in api.get(f"/v1/jobs/{job_id}/artifacts").json()}
    assert "model.safetensors" not in names and "attempt-1.log" in names
    assert delete(api, f"/v1/jobs/{job_id}").status_code == 204  # still deletable afterwards


def test_delete_uploaded_dataset_frees_its_folder(api, tmp_path):
    dataset = upload_dataset(api, tmp_path)
    folder = api.settings.data_dir / "datasets" / dataset
    assert folder.is_dir()
    job_id = submit(api, train_body(dataset))
    assert delete(api, f"/v1/datasets/{dataset}").status_code == 409
    with api.session() as s:  # running is refused too
        assert leases.claim_job(s, job_id=job_id, worker_id="w", lease_seconds=60) is not None
    assert delete(api, f"/v1/datasets/{dataset}").status_code == 409
    with api.session() as s:
        assert leases.finish_job(s, job_id=job_id, worker_id="w", status="failed", error="x")
        s.commit()

    assert delete(api, f"/v1/datasets/{dataset}").status_code == 204
    assert not folder.exists()
    assert api.get(f"/v1/datasets/{dataset}").status_code == 404
    assert api.get("/v1/datasets").json()["total"] == 0
    assert api.get(f"/v1/jobs/{job_id}").json()["train_dataset_id"] == dataset
    assert api.post("/v1/jobs", json=train_body(dataset)).status_code == 422


def test_delete_dataset_registered_by_path_leaves_the_users_files(api):
    dataset = api.register_dataset()
    with api.session() as s:
        annotations = Path(s.get(Dataset, dataset).annotations_path)
    assert delete(api, f"/v1/datasets/{dataset}").status_code == 204
    assert annotations.is_file() and (annotations.parent / "images").is_dir()
    assert api.get(f"/v1/datasets/{dataset}").status_code == 404


def test_delete_job_refused_while_its_model_teaches_a_queued_job(api):
    dataset = api.register_dataset()
    job_id = submit(api, train_body(dataset))
    model_id = finish_like_the_worker(api, job_id)
    student = submit(api, train_body(dataset, kind="distill", teacher={"model_id": model_id}))
    r = delete(api, f"/v1/jobs/{job_id}")
    assert r.status_code == 409 and student in r.json()["detail"]
    assert (api.settings.data_dir / "jobs" / job_id / "export" / "model.safetensors").is_file()
    assert api.post(f"/v1/jobs/{student}/cancel").status_code == 200
    assert delete(api, f"/v1/jobs/{job_id}").status_code == 204
