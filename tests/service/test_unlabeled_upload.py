"""Image-only datasets by upload (issue #12 item 2 over REST without server paths): a zip of images,
optionally with a COCO file listing them; the refusals name the field and leave nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

from service import crud
from service.models import Job
from tests.service.helpers import TINY_MODEL, write_coco
from tests.service.test_service_api_datasets import assert_nothing_stored, zip_folder


def upload_unlabeled(api, images: bytes, listing: bytes | None = None, unlabeled: str = "true", name: str = "u"):
    files = {"images": ("i.zip", images, "application/zip")}
    if listing is not None:
        files["annotations"] = ("list.json", listing, "application/json")
    return api.post("/v1/datasets", data={"name": name, "unlabeled": unlabeled}, files=files)


def test_upload_a_zip_of_images_then_distill_with_it(api, tmp_path: Path):
    ann = write_coco(tmp_path / "src", num_images=3)
    r = upload_unlabeled(api, zip_folder(tmp_path / "src" / "images", "photos/"))  # wrapped in one folder
    assert r.status_code == 201, r.text
    out = r.json()
    assert (out["labeled"], out["num_images"], out["num_annotations"], out["categories"], out["source"]) == (
        False, 3, 0, [], "upload")
    with api.session() as s:
        row = crud.get_dataset(s, owner_id=api.owner_ids["alice"], dataset_id=out["id"])
        assert row.annotations_path is None
        stored = Path(row.images_path)
    assert stored.is_relative_to(api.settings.data_dir / "datasets")
    names = sorted(img["file_name"] for img in json.loads(ann.read_text())["images"])
    assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*.png")) == [f"photos/{n}" for n in names]

    # a listing narrows the images to the ones it names
    listing = {"images": json.loads(ann.read_text())["images"][:2]}
    r = upload_unlabeled(api, zip_folder(tmp_path / "src" / "images"), json.dumps(listing).encode(), name="two")
    assert r.status_code == 201 and r.json()["num_images"] == 2, r.text

    train = api.register_dataset(num_classes=2)
    teacher = api.add_model({**TINY_MODEL, "fpn_channels": 32}, categories=["class_0", "class_1"])
    job = {"kind": "distill", "student": dict(TINY_MODEL), "train_dataset": train, "teacher": {"model_id": teacher},
           "unlabeled_dataset": out["id"], "hyperparameters": {"max_iters": 4, "batch_size": 2}}
    r = api.post("/v1/jobs", json=job)
    assert r.status_code == 201, r.text
    with api.session() as s:
        data = s.get(Job, r.json()["id"]).engine_config["data"]
    assert data["unlabeled_images"] == str(stored) and data["unlabeled_annotations"] is None


def test_refusals_name_the_field_and_store_nothing(api, tmp_path: Path):
    write_coco(tmp_path / "src", num_images=2)
    images = zip_folder(tmp_path / "src" / "images")
    # labeled (the default) still needs its annotation file
    r = api.post("/v1/datasets", data={"name": "x"}, files={"images": ("i.zip", images, "application/zip")})
    assert r.status_code == 422 and [e["loc"] for e in r.json()["detail"]] == [["body", "annotations"]], r.text
    r = upload_unlabeled(api, images, unlabeled="maybe")
    assert r.status_code == 422 and ["body", "unlabeled"] in [e["loc"] for e in r.json()["detail"]], r.text
    # a zip without any image file
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "readme.txt").write_text("no images here")
    r = upload_unlabeled(api, zip_folder(tmp_path / "text"))
    detail = r.json()["detail"]
    assert r.status_code == 422 and detail[0]["loc"] == ["body", "images"] and "no image files" in detail[0]["msg"]
    assert str(api.settings.data_dir) not in r.text  # staging paths mean nothing to the client
    # a listing naming an image the zip lacks
    listing = {"images": [{"id": 1, "file_name": "missing.png", "width": 32, "height": 32}]}
    r = upload_unlabeled(api, images, json.dumps(listing).encode())
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] in (["body", "images"], ["body", "annotations"])
    assert str(api.settings.data_dir) not in r.text
    assert_nothing_stored(api)
