"""Image-only datasets over REST and distillation jobs that add one (issue #12 item 2): registration
(a folder, or a COCO file listing images only), confinement, and the 422s of misuse."""

from __future__ import annotations

import json
import os
import uuid

import pytest

from service import crud
from service.models import Job
from tests.service.helpers import TINY_MODEL, write_coco


@pytest.fixture
def setup(api):
    return {"train": api.register_dataset(num_classes=2),
            "teacher": api.add_model({**TINY_MODEL, "fpn_channels": 32}, categories=["class_0", "class_1"])}


def image_folder(api, n: int = 3):
    folder = api.roots / f"u-{uuid.uuid4().hex[:8]}"
    ann = write_coco(folder, num_images=n)
    return folder / "images", ann


def register_unlabeled(api, **body):
    return api.post("/v1/datasets", json={"name": f"u-{uuid.uuid4().hex[:6]}", "unlabeled": True, **body})


def job_body(ids, **overrides):
    body = {"kind": "distill", "student": dict(TINY_MODEL), "train_dataset": ids["train"],
            "teacher": {"model_id": ids["teacher"]}, "hyperparameters": {"max_iters": 4, "batch_size": 2}}
    return {**body, **overrides}


def test_register_a_folder_or_an_image_only_coco_file(api):
    images, ann = image_folder(api)
    r = register_unlabeled(api, images=str(images))
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["labeled"] is False and out["num_images"] == 3 and out["categories"] == []
    with api.session() as s:
        assert crud.get_dataset(s, owner_id=api.owner_ids["alice"], dataset_id=out["id"]).annotations_path is None

    listing = ann.parent / "list.json"
    listing.write_text(json.dumps({"images": json.loads(ann.read_text())["images"][:2]}))
    r = register_unlabeled(api, images=str(images), annotations=str(listing))
    assert r.status_code == 201 and r.json()["num_images"] == 2, r.text
    # a labeled registration still needs its annotation file
    r = api.post("/v1/datasets", json={"name": "x", "images": str(images)})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "annotations"]


def test_unlabeled_registration_is_confined_and_follows_no_link(api, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    r = register_unlabeled(api, images=str(outside))
    assert r.status_code == 403 and r.json()["detail"][0]["loc"] == ["body", "images"]
    images, _ = image_folder(api, n=1)
    listing = images.parent / "list.json"
    os.symlink(images / "img_0.png", images / "link.png")
    listing.write_text(json.dumps({"images": [{"id": 1, "file_name": "link.png", "width": 32, "height": 32}]}))
    r = register_unlabeled(api, images=str(images), annotations=str(listing))
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "unsafe_image_file", r.text
    empty = api.roots / f"empty-{uuid.uuid4().hex[:6]}"
    empty.mkdir()
    r = register_unlabeled(api, images=str(empty))
    assert r.status_code == 422 and "no image files" in r.json()["detail"][0]["msg"]


def test_distill_job_takes_an_unlabeled_dataset(api, setup):
    images, _ = image_folder(api)
    unlabeled = register_unlabeled(api, images=str(images)).json()["id"]
    r = api.post("/v1/jobs", json=job_body(setup, unlabeled_dataset=unlabeled,
                                           hyperparameters={"max_iters": 4, "batch_size": 2, "unlabeled_ratio": 0.25}))
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["unlabeled_dataset_id"] == unlabeled
    with api.session() as s:
        row = s.get(Job, job["id"])
        data = row.engine_config["data"]
    assert data["unlabeled_images"] == str(images) and data["unlabeled_annotations"] is None
    assert row.engine_config["hyperparameters"]["unlabeled_ratio"] == 0.25
    # a labeled dataset serves as unlabeled images too: its labels and classes are never read
    other = api.register_dataset(num_classes=5)
    assert api.post("/v1/jobs", json=job_body(setup, unlabeled_dataset=other)).status_code == 201
    # in use by a queued job: not deletable
    assert api.client.delete(f"/v1/datasets/{unlabeled}", headers=api.auth()).status_code == 409


def test_misuse_is_a_422_naming_the_field(api, setup):
    images, _ = image_folder(api)
    unlabeled = register_unlabeled(api, images=str(images)).json()["id"]
    train = {**job_body(setup, unlabeled_dataset=unlabeled), "kind": "train"}
    del train["teacher"]
    r = api.post("/v1/jobs", json=train)
    assert r.status_code == 422 and [e["loc"] for e in r.json()["detail"]] == [["body", "unlabeled_dataset"]]
    # an image-only dataset cannot be trained or evaluated on: one error each, no class mismatch besides
    r = api.post("/v1/jobs", json=job_body(setup, train_dataset=unlabeled, val_dataset=unlabeled))
    assert r.status_code == 422
    assert sorted(e["loc"] for e in r.json()["detail"]) == [["body", "train_dataset"], ["body", "val_dataset"]]
    r = api.post("/v1/jobs", json=job_body(setup, unlabeled_dataset="nope"))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "unlabeled_dataset"]
    r = api.post("/v1/jobs", json=job_body(setup, hyperparameters={"unlabeled_ratio": 1.0}))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][:3] == ["body", "hyperparameters", "unlabeled_ratio"]
