"""``GET /v1/usage`` (bytes and counts by kind, per owner) and the checkpoint retention of
succeeded jobs (``Storage.release_checkpoints``, called by the worker)."""

from __future__ import annotations

from pathlib import Path

from service import deletion
from service.storage import Storage
from tests.service.helpers import finish_like_the_worker
from tests.service.test_service_delete import delete, stored_model, submit, train_body, upload_dataset


def usage(api, who: str = "alice") -> dict:
    r = api.get("/v1/usage", who)
    assert r.status_code == 200, r.text
    return r.json()


def files_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_usage_counts_each_stored_file_once_per_owner(api, tmp_path):
    empty = {"count": 0, "bytes": 0}
    assert usage(api) == {"datasets": empty, "models": empty, "jobs": empty, "total_bytes": 0, "exact": True}
    uploaded = upload_dataset(api, tmp_path)
    in_place = api.register_dataset()  # the user's own folder: counted, not stored
    _, model_path = stored_model(api, size=700)
    job_id = submit(api, train_body(in_place))
    finish_like_the_worker(api, job_id, checkpoint_bytes=3000, weights_bytes=1000)
    job_dir = api.settings.data_dir / "jobs" / job_id

    dataset_bytes = files_bytes(api.settings.data_dir / "datasets" / uploaded)
    job_bytes = files_bytes(job_dir)
    assert job_bytes >= 4000 and dataset_bytes > 0
    got = usage(api)
    assert got["datasets"] == {"count": 2, "bytes": dataset_bytes}
    assert got["models"] == {"count": 2, "bytes": 700}  # the job's output model counts with the job
    assert got["jobs"] == {"count": 1, "bytes": job_bytes}
    assert got["total_bytes"] == dataset_bytes + 700 + job_bytes and got["exact"] is True
    assert usage(api, "bob")["total_bytes"] == 0  # per owner

    # Retention: the checkpoints of a succeeded job go, the export and log stay.
    assert Storage(api.settings.data_dir).release_checkpoints(job_id) == 3000
    assert (job_dir / "export" / "model.safetensors").is_file() and not (job_dir / "checkpoints").exists()
    assert usage(api)["jobs"]["bytes"] == job_bytes - 3000

    # Deleting the job moves its output model under models/: it is counted there now.
    assert delete(api, f"/v1/jobs/{job_id}").status_code == 204
    assert delete(api, f"/v1/datasets/{uploaded}").status_code == 204
    got = usage(api)
    assert got["jobs"] == {"count": 0, "bytes": 0} and got["datasets"] == {"count": 1, "bytes": 0}
    assert got["models"] == {"count": 2, "bytes": 1700}
    assert model_path.is_file()


def test_usage_walk_is_bounded(api, monkeypatch):
    job_id = submit(api, train_body(api.register_dataset()))
    finish_like_the_worker(api, job_id)
    monkeypatch.setattr(deletion, "USAGE_MAX_ENTRIES", 2)
    got = usage(api)
    assert got["exact"] is False and got["jobs"]["count"] == 1


def test_release_checkpoints_of_a_job_without_any(tmp_path):
    storage = Storage(tmp_path)
    assert storage.release_checkpoints("no-such-job") == 0
