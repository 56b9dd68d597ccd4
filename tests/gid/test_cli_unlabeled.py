"""``gid datasets register --unlabeled`` against a real API over HTTP (issue #12 item 2): a folder
or an image-only COCO listing becomes a dataset with ``labeled`` false that a distill job submitted
by the CLI names as its ``unlabeled_dataset``; misuse is one line naming the option, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

from tests.gid.test_cli_polish import db_url, gid, live, ok  # noqa: F401 - fixtures
from tests.service.conftest import api, redis_server, settings  # noqa: F401 - fixtures
from tests.service.helpers import TINY_MODEL, write_coco


def test_register_unlabeled_folder_and_listing_then_submit_a_distill_job(live, tmp_path: Path):
    api, env = live
    folder = api.roots / "raw"
    ann = write_coco(folder, num_images=3)
    images = folder / "images"

    out = gid(env, "datasets", "register", "--name", "raw", "--images", str(images), "--unlabeled")
    assert out.returncode == 0, out.stderr
    dataset_id = out.stdout.strip()
    assert "3 images" in out.stderr and "unlabeled" in out.stderr
    shown = api.get(f"/v1/datasets/{dataset_id}").json()
    assert shown["labeled"] is False and shown["num_images"] == 3 and shown["categories"] == []

    # a COCO file listing some of the images (no annotations): only those are the dataset
    listing = folder / "listing.json"
    listing.write_text(json.dumps({"images": json.loads(ann.read_text())["images"][:2]}))
    out = gid(env, "datasets", "register", "--name", "raw-2", "--images", str(images),
              "--annotations", str(listing), "--unlabeled")
    assert out.returncode == 0 and "2 images" in out.stderr, out.stderr

    # a distill job names it (by name) as its unlabeled images
    train = api.register_dataset(num_classes=2)
    teacher = api.add_model({**TINY_MODEL, "fpn_channels": 32}, categories=["class_0", "class_1"])
    body = {"kind": "distill", "student": dict(TINY_MODEL), "train_dataset": train, "teacher": {"model_id": teacher},
            "unlabeled_dataset": "raw", "hyperparameters": {"max_iters": 4, "batch_size": 2, "unlabeled_ratio": 0.5}}
    (tmp_path / "job.json").write_text(json.dumps(body))
    job_id = ok(env, "submit", str(tmp_path / "job.json")).strip()
    assert api.get(f"/v1/jobs/{job_id}").json()["unlabeled_dataset_id"] == dataset_id


def test_register_misuse_is_one_line_naming_the_problem(live, tmp_path: Path):
    api, env = live
    images = write_coco(api.roots / "raw", num_images=1).parent / "images"
    # labeled registration without annotations: refused by the CLI before any request
    out = gid(env, "datasets", "register", "--name", "x", "--images", str(images))
    assert out.returncode != 0 and "--annotations is required unless --unlabeled" in out.stderr

    outside = tmp_path / "outside"  # not under the server's data roots
    write_coco(outside, num_images=1)
    out = gid(env, "datasets", "register", "--name", "x", "--images", str(outside / "images"), "--unlabeled")
    assert out.returncode != 0 and "images" in out.stderr and out.stdout == ""

    empty = api.roots / "empty"
    empty.mkdir()
    out = gid(env, "datasets", "register", "--name", "x", "--images", str(empty), "--unlabeled")
    assert out.returncode != 0 and "no image files" in out.stderr and out.stdout == ""
    assert api.get("/v1/datasets").json()["items"] == []  # nothing half-registered
