"""``GET /v1/specs/{kind}``: the served body, once its placeholders are filled in, is accepted as
is; every field is described; defaults fit the model asked for and this server's limits."""

from __future__ import annotations

import pytest

from tests.service.helpers import TINY_MODEL, Api

SMALL = {"min_size": 64, "max_size": 64, "num_classes": 2}


def spec(api: Api, kind: str, **params) -> dict:
    r = api.get(f"/v1/specs/{kind}", params=params)
    assert r.status_code == 200, r.text
    return r.json()


def fill(body: dict, placeholders: list[str], values: dict[str, str]) -> dict:
    for dotted in placeholders:
        *parents, last = dotted.split(".")
        target = body
        for key in parents:
            target = target[key]
        target[last] = values[dotted]
    return body


def leaves(body: dict, prefix: str = "") -> list[str]:
    paths = []
    for key, value in body.items():
        paths.append(prefix + key)
        if isinstance(value, dict):
            paths += leaves(value, f"{prefix}{key}.")
    return paths


@pytest.mark.parametrize("kind", ["train", "distill"])
def test_served_body_is_accepted_once_placeholders_are_filled(api: Api, kind: str):
    dataset = api.register_dataset(num_classes=2)
    teacher = api.add_model({**TINY_MODEL, "norm": "bn"})
    served = spec(api, kind, **SMALL)
    expected = {"train_dataset", "val_dataset"} | ({"teacher.model_id"} if kind == "distill" else set())
    assert set(served["placeholders"]) == expected and served["accepted"] is True
    body = fill(served["body"], served["placeholders"],
                {"train_dataset": dataset, "val_dataset": dataset, "teacher.model_id": teacher})
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == kind and r.json()["train_dataset_id"] == dataset


def test_choices_by_name_leave_no_placeholder_and_fit_the_teacher(api: Api):
    api.register_dataset(num_classes=2)
    with api.session() as s:  # a unique dataset name to pick it by
        from service.models import Dataset

        row = s.query(Dataset).one()
        row.name = "shapes"
        s.commit()
    teacher = api.add_model({**TINY_MODEL, "norm": "bn", "anchor_sizes": [4, 8, 16, 32, 64]})
    served = spec(api, "distill", teacher=teacher[:8], train_dataset="shapes", max_iters=40)
    assert served["placeholders"] == []
    body = served["body"]
    assert body["teacher"]["model_id"] == teacher
    student = body["student"]
    assert (student["arch"], student["num_classes"], student["min_size"], student["max_size"]) == ("retinanet", 2, 64, 64)
    assert student["anchor_sizes"] == [4, 8, 16, 32, 64]
    hp = body["hyperparameters"]
    assert (hp["max_iters"], hp["warmup_iters"], hp["checkpoint_period"]) == (40, 4, 40)
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text


def test_every_field_is_described_and_the_schema_is_served(api: Api):
    for kind in ("train", "distill", "evaluate"):
        served = spec(api, kind)
        missing = [p for p in leaves(served["body"]) if not served["fields"].get(p, {}).get("description")]
        assert missing == [], f"{kind}: undocumented {missing}"
        assert set(served["body"]) <= set(served["schema"]["properties"])
    assert served["fields"]["dataset"]["required"] is True and served["fields"]["batch_size"]["required"] is False
    assert served["fields"]["model_id"]["required"] is False  # model_id or weights: the body's own rule


def test_evaluate_body_is_accepted_once_placeholders_are_filled(api: Api):
    dataset = api.register_dataset(num_classes=2)
    model = api.add_model(TINY_MODEL)
    served = spec(api, "evaluate")
    assert served["accepted"] is True and served["notes"]
    assert served["body"]["kind"] == "evaluate" and set(served["placeholders"]) == {"model_id", "dataset"}
    body = fill(served["body"], served["placeholders"], {"model_id": model, "dataset": dataset})
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "evaluate" and r.json()["val_dataset_id"] == dataset
    # a torchvision detector by name: its input size brought within this server's limit
    api.configure(max_image_size=256)
    body = spec(api, "evaluate", weights="torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1")["body"]
    assert (body["weights"], body["min_size"], body["max_size"]) == (
        "torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1", 256, 256)


def test_defaults_fit_the_input_size_and_the_server_limits(api: Api):
    student = spec(api, "train", min_size=128)["body"]["student"]
    assert student["anchor_sizes"] == [8, 16, 32, 64, 128] and student["max_size"] == 214
    assert spec(api, "train", min_size=128, arch="fcos")["body"]["student"]["anchor_sizes"] is None
    assert spec(api, "train")["body"]["student"]["anchor_sizes"] is None  # 800 px: torchvision's own
    api.configure(max_iters=50, max_image_size=256, max_batch_per_device=2)
    body = spec(api, "train")["body"]
    assert body["hyperparameters"]["max_iters"] == 50 and body["hyperparameters"]["batch_size"] == 2
    assert (body["student"]["min_size"], body["student"]["max_size"]) == (256, 256)


def test_weights_name_gives_arch_classes_and_input_size(api: Api):
    name = "torchvision:FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1"
    body = spec(api, "train", weights=name)["body"]
    student = body["student"]
    assert (student["arch"], student["backbone"], student["num_classes"]) == ("fasterrcnn", "mobilenet_v3_large", 90)
    assert (student["min_size"], student["max_size"], student["anchor_sizes"]) == (320, 640, None)
    assert spec(api, "distill", weights=name)["body"]["teacher"]["weights"] == name


def test_bad_choices_name_the_query_field(api: Api):
    r = api.get("/v1/specs/distill", params={"weights": "torchvision:Nope.V1", "teacher": "missing-model"})
    assert r.status_code == 422
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {("query", "weights"), ("query", "teacher")}
    r = api.get("/v1/specs/train", params={"min_size": 600, "max_size": 400})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"][0] == "query"
    assert api.get("/v1/specs/frobnicate").status_code == 422
    assert api.client.get("/v1/specs/train").status_code == 401
