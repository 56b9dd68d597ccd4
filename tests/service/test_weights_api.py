"""torchvision weights by name over the API: offline first.

A job naming weights whose file is not in the server's cache (``<torch_home>/hub/checkpoints``) is
refused at submission with the file to place; ``GET /v1/weights`` lists the names and what is
present; ``PUT /v1/weights/{name}`` accepts only torchvision's file (sha256 prefix in its name).
Only presence matters at submission, so the cache files here are small stand-ins under
torchvision's file names; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torchvision.models as tvm
import torchvision.models.detection as tvd

from gid_core.weights import categories_for, lookup, model_config_for
from service import jobspec, leases, weights_store
from service.errors import FieldErrors
from service.models import Dataset
from service.schemas import JobCreate
from tests.service.helpers import TINY_MODEL

RETINANET = "torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"
RETINANET_FILE = tvd.RetinaNet_ResNet50_FPN_Weights.COCO_V1.url.rsplit("/", 1)[-1]
RESNET18 = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
RESNET18_FILE = tvm.ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[-1]


def errors_at(response, *loc) -> list[dict]:
    return [e for e in response.json()["detail"] if tuple(e["loc"]) == ("body", *loc)]


def place(api, file_name: str, data: bytes = b"stand-in") -> None:
    path = weights_store.cache_dir(api.settings) / file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def dataset(api) -> str:
    return api.register_dataset(num_classes=2)


def distill_body(dataset: str, teacher: dict, **student) -> dict:
    return {
        "kind": "distill", "student": {**TINY_MODEL, "backbone": "resnet50", **student}, "teacher": teacher,
        "train_dataset": dataset, "hyperparameters": {"max_iters": 5, "batch_size": 2},
    }


def train_body(dataset: str, **student) -> dict:
    return {"kind": "train", "student": {**TINY_MODEL, **student}, "train_dataset": dataset,
            "hyperparameters": {"max_iters": 5, "batch_size": 2}}


def test_teacher_weights_missing_from_the_cache_is_refused_at_submission(api, dataset):
    r = api.post("/v1/jobs", json=distill_body(dataset, {"weights": RETINANET}))
    assert r.status_code == 422, r.text
    (missing,) = [e for e in errors_at(r, "teacher", "weights") if e["type"] == "weights_missing"]
    where = weights_store.cache_dir(api.settings) / RETINANET_FILE
    assert RETINANET_FILE in missing["msg"] and str(where) in missing["msg"]
    assert f"gid weights import {RETINANET}" in missing["msg"]
    # once the file is there, the name resolves (other rules, e.g. the classes, may still apply)
    place(api, RETINANET_FILE)
    r = api.post("/v1/jobs", json=distill_body(dataset, {"weights": RETINANET}))
    assert r.status_code == 201 or not [e for e in r.json()["detail"] if e["type"] == "weights_missing"], r.text


def test_download_allowed_accepts_a_missing_file(api, dataset):
    api.configure(allow_weights_download=True)
    r = api.post("/v1/jobs", json=train_body(dataset, backbone_weights=RESNET18))
    assert r.status_code == 201, r.text


def test_teacher_reference_is_model_id_or_weights(api, dataset):
    for teacher in ({}, {"model_id": "m", "weights": RETINANET}):
        r = api.post("/v1/jobs", json=distill_body(dataset, teacher))
        assert r.status_code == 422 and "exactly one of model_id and weights" in r.text, r.text
    for name in ("torchvision:NoSuch_Weights.COCO_V1", "torchvision:RetinaNet_ResNet50_FPN_Weights.NOPE",
                 "torchvision:ResNet18_Weights.IMAGENET1K_V1"):  # the last one is no detector
        r = api.post("/v1/jobs", json=distill_body(dataset, {"weights": name}))
        assert r.status_code == 422, r.text
        assert [e["type"] for e in errors_at(r, "teacher", "weights")] == ["unknown_weights"], r.text


def test_teacher_by_weights_is_the_published_detector_at_the_students_size():
    """The engine config carries the name and the detector it rebuilds; the teacher sees the
    student's images, so it takes the student's min_size/max_size."""
    student = {**TINY_MODEL, "backbone": "resnet50", "num_classes": 90}
    request = JobCreate.model_validate({
        "kind": "distill", "student": student, "teacher": {"weights": RETINANET}, "train_dataset": "d",
    })
    teacher, errors = jobspec.torchvision_teacher(RETINANET, request.student)
    assert errors == [] and teacher.field == "weights" and teacher.model is None
    assert teacher.categories == categories_for(RETINANET)
    expected = model_config_for(RETINANET).model_dump(mode="json")
    assert teacher.config.model_dump(mode="json") == {**expected, "min_size": 64, "max_size": 64}
    dataset = Dataset(id="d", annotations_path="/a.json", images_path="/i", categories=teacher.categories)
    engine = jobspec.build_engine_config(request, train=dataset, val=None, teacher=teacher, init=None)
    assert engine.teacher.weights == RETINANET and engine.teacher.frozen_bn_eps == 0.0


def test_teacher_weights_of_another_arch_name_the_weights_field(api, dataset):
    place(api, RETINANET_FILE)
    r = api.post("/v1/jobs", json=distill_body(dataset, {"weights": RETINANET}, arch="fcos", fpn_channels=64))
    assert r.status_code == 422
    assert any("teacher.arch (retinanet)" in e["msg"] for e in errors_at(r, "teacher", "weights")), r.text


def test_student_backbone_weights(api, dataset):
    r = api.post("/v1/jobs", json=train_body(dataset, backbone_weights=RESNET18))
    assert r.status_code == 422
    (missing,) = errors_at(r, "student", "backbone_weights")
    assert missing["type"] == "weights_missing" and RESNET18_FILE in missing["msg"]
    r = api.post("/v1/jobs", json=train_body(dataset, backbone_weights="torchvision:ResNet50_Weights.IMAGENET1K_V2"))
    assert [e["type"] for e in errors_at(r, "student", "backbone_weights")] == ["weights_mismatch"], r.text
    place(api, RESNET18_FILE)
    r = api.post("/v1/jobs", json=train_body(dataset, backbone_weights=RESNET18))
    assert r.status_code == 201, r.text
    with api.session() as s:
        student = leases.get_job(s, job_id=r.json()["id"]).engine_config["student"]
    assert student["backbone_weights"] == RESNET18 and student["norm"] == "frozen_bn"


def test_list_weights(api):
    place(api, RESNET18_FILE)
    r = api.get("/v1/weights")
    assert r.status_code == 200
    by_name = {w["name"]: w for w in r.json()}
    assert RETINANET in by_name and RESNET18 in by_name
    assert "torchvision:FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1" in by_name
    retina = by_name[RETINANET]
    assert (retina["kind"], retina["arch"], retina["backbone"]) == ("detector", "retinanet", "resnet50")
    assert retina["categories"][0] == "person" and len(retina["categories"]) == 90
    assert retina["file_name"] == RETINANET_FILE and retina["present"] is False
    assert RETINANET_FILE.endswith(f"-{retina['hash_prefix']}.pth")
    resnet = by_name[RESNET18]
    assert (resnet["kind"], resnet["arch"], resnet["categories"], resnet["present"]) == ("backbone", None, None, True)
    assert api.client.get("/v1/weights").status_code == 401


def test_put_weights_refuses_a_file_that_is_not_torchvisions(api):
    cache = weights_store.cache_dir(api.settings)
    url = f"/v1/weights/{RESNET18}"
    r = api.client.put(url, content=b"x" * 1000, headers=api.auth())
    assert r.status_code == 422, r.text
    assert r.json()["detail"][0]["type"] == "hash_mismatch" and RESNET18_FILE in r.text
    assert not (cache / RESNET18_FILE).exists() and list(cache.iterdir()) == []  # nothing half-made
    # what was there stays
    place(api, RESNET18_FILE, b"before")
    assert api.client.put(url, content=b"y" * 10, headers=api.auth()).status_code == 422
    assert (cache / RESNET18_FILE).read_bytes() == b"before"
    assert api.client.put(url, content=b"x", headers={}).status_code == 401
    assert api.client.put("/v1/weights/torchvision:NoSuch.X", content=b"x", headers=api.auth()).status_code == 404
    big = api.client.put(url, content=b"z" * (api.settings.max_upload_bytes + 1), headers=api.auth())
    assert big.status_code == 413


def test_store_accepts_a_file_whose_hash_starts_with_the_prefix(api):
    """The upload's check and write, with the stand-in's own prefix in place of torchvision's."""
    data = b"a stand-in for torchvision's file" * 100
    prefix = hashlib.sha256(data).hexdigest()[:8]
    spec = lookup(RESNET18, kind="backbone")
    stored = weights_store.store([data[:1000], data[1000:]], spec, api.settings, expected_prefix=prefix)
    assert stored["present"] and stored["sha256"].startswith(prefix) and stored["size"] == len(data)
    cache = weights_store.cache_dir(api.settings)
    assert (cache / RESNET18_FILE).read_bytes() == data and [p.name for p in cache.iterdir()] == [RESNET18_FILE]
    with pytest.raises(FieldErrors):
        weights_store.store([data], spec, api.settings, expected_prefix="0" + prefix[1:] if prefix[0] != "0" else "1")
    assert (cache / RESNET18_FILE).read_bytes() == data


def test_hash_matches():
    digest = hashlib.sha256(b"x").hexdigest()
    assert weights_store.hash_matches(digest, digest[:8]) and weights_store.hash_matches(digest, digest[:8].upper())
    assert not weights_store.hash_matches(digest, "") and not weights_store.hash_matches(digest, "0" * 8)


def test_worker_downloads_only_what_is_missing_with_torchvisions_hash_check(tmp_path, monkeypatch):
    """The training child's fetch (``allow_weights_download``): files in $TORCH_HOME's cache are
    used as they are; a missing one goes to torch.hub's downloader with the prefix of its name.
    There is no network here: the downloader is replaced by one that records the request."""
    import torch

    from gid_core.config import DataConfig, JobConfig, ModelConfig

    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    fetched = []

    def fetch(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, Path(dst).name, hash_prefix))
        Path(dst).write_bytes(b"fetched")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fetch)
    cache = home / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / RESNET18_FILE).write_bytes(b"placed")
    student = ModelConfig(**{**TINY_MODEL, "backbone": "resnet18", "backbone_weights": RESNET18})
    teacher = ModelConfig(**{**model_config_for(RETINANET).model_dump(), "min_size": 64, "max_size": 64})
    job = JobConfig(kind="distill", student={**student.model_dump(), "num_classes": 90}, teacher=teacher,
                    data=DataConfig(train_annotations=tmp_path / "a.json", train_images=tmp_path))
    paths = weights_store.download_missing(job)
    assert paths == [cache / RESNET18_FILE, cache / RETINANET_FILE]
    member = tvd.RetinaNet_ResNet50_FPN_Weights.COCO_V1
    assert fetched == [(member.url, RETINANET_FILE, RETINANET_FILE.rsplit("-", 1)[1].split(".")[0])]
    assert (cache / RESNET18_FILE).read_bytes() == b"placed"


def test_a_model_trained_from_an_imagenet_backbone_can_teach(api, dataset):
    """Its recorded config names the ImageNet start; as a teacher its own file holds every weight,
    so the start is not needed (and the file need not be in the cache)."""
    teacher = api.add_model({**TINY_MODEL, "backbone_weights": RESNET18})
    body = {**distill_body(dataset, {"model_id": teacher}), "student": dict(TINY_MODEL)}
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    with api.session() as s:
        engine = leases.get_job(s, job_id=r.json()["id"]).engine_config
    assert engine["teacher"]["backbone_weights"] is None and engine["teacher"]["weights"].endswith(".safetensors")
