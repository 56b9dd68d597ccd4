"""``kind: evaluate`` jobs: refused at submission with the field at fault, and run by a real worker
whose metrics equal a direct ``gid_core`` evaluation of the same model on the same dataset."""

from __future__ import annotations

import io

import pytest

from gid_core.config import EvalConfig, ModelConfig
from gid_core.engine import run_evaluation
from gid_core.models import build_detector, save_state_dict_file
from tests.service.helpers import TINY_MODEL
from tests.worker.conftest import stack, tiny_dataset, worker_tmp  # noqa: F401 - fixtures
from tests.worker.helpers import Api as StackApi
from tests.worker.helpers import tiny_student

COCO_RETINANET = "torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"


def locs(response) -> dict[tuple, str]:
    assert response.status_code == 422, response.text
    return {tuple(e["loc"]): e["msg"] for e in response.json()["detail"]}


def test_refusals_name_the_field(api):
    dataset = api.register_dataset(names=["cat", "unicorn"])
    model = api.add_model(TINY_MODEL, categories=["cat", "dog"])
    body = {"kind": "evaluate", "model_id": model, "dataset": dataset}

    found = locs(api.post("/v1/jobs", json={**body, "model_id": "nope", "dataset": "nope"}))
    assert {("body", "model_id"), ("body", "dataset")} <= set(found)
    assert "exactly one" in locs(api.post("/v1/jobs", json={**body, "weights": COCO_RETINANET}))[("body",)]
    assert "unicorn" in locs(api.post("/v1/jobs", json=body))[("body", "model_id")]  # a class the model lacks
    found = locs(api.post("/v1/jobs", json={**body, "class_map": {"unicorn": "horse"}}))
    assert "horse" in found[("body", "class_map", "unicorn")]
    found = locs(api.post("/v1/jobs", json={**body, "batch_size": 4096, "resources": {"nodes": 2}}))
    assert {("body", "batch_size"), ("body", "resources", "nodes")} <= set(found)
    found = locs(api.post("/v1/jobs", json={**body, "dataset": 3}))  # schema errors: no union tag in the loc
    assert set(found) == {("body", "dataset")}
    assert set(locs(api.post("/v1/jobs", json={**body, "kind": "predict"}))) == {("body", "kind")}

    # torchvision's COCO detector: its classes meet the dataset's by name; its file must be on the server
    coco = {"kind": "evaluate", "weights": COCO_RETINANET, "dataset": dataset, "min_size": 64, "max_size": 64}
    errors = api.post("/v1/jobs", json=coco).json()["detail"]
    assert [e["loc"] for e in errors] == [["body", "weights"]] * 2, errors
    assert any("unicorn" in e["msg"] for e in errors) and any("gid weights import" in e["msg"] for e in errors)

    mapped = api.post("/v1/jobs", json={**body, "class_map": {"unicorn": "dog"}, "tags": ["ev"]})
    assert mapped.status_code == 201, mapped.text
    job = mapped.json()
    assert job["kind"] == "evaluate" and job["val_dataset_id"] == dataset and job["init_model_id"] == model
    assert [j["id"] for j in api.get("/v1/jobs?kind=evaluate").json()["items"]] == [job["id"]]


def _upload_detecting_model(stack_api, tmp_path, name: str = "eval-me") -> str:
    """A random tiny RetinaNet whose classifier prior is raised, so that it detects something."""
    config = ModelConfig(**tiny_student(), norm="frozen_bn")
    model = build_detector(config, load_weights=False)
    model.head.classification_head.cls_logits.bias.data.fill_(1.0)
    path = tmp_path / "m.safetensors"
    save_state_dict_file(model.state_dict(), path)
    files = {"file": ("m.safetensors", io.BytesIO(path.read_bytes()))}
    data = {"name": name, "config": config.model_dump_json(exclude={"weights"})}
    return stack_api.post("/v1/models", files=files, data=data)["id"]


@pytest.mark.slow
def test_worker_evaluates_a_model_as_gid_core_does(stack, tiny_dataset, tmp_path):
    stack_api = StackApi(stack)  # the real stack's API (this module's ``api`` is the in-process one)
    stack_api.post("/v1/datasets", json={"name": "eval-val", "annotations": tiny_dataset["val_annotations"],
                                         "images": tiny_dataset["val_images"]})
    model_id = _upload_detecting_model(stack_api, tmp_path)
    job = stack_api.post("/v1/jobs", json={"kind": "evaluate", "model_id": "eval-me", "dataset": "eval-val",
                                           "batch_size": 4})
    done = stack_api.wait_terminal(job["id"], timeout=180)
    assert done["status"] == "succeeded", done

    stored = stack_api.get(f"/v1/models/{model_id}")
    direct = run_evaluation(EvalConfig(
        model=ModelConfig(**stored["config"], weights=str(tmp_path / "m.safetensors")),
        annotations=tiny_dataset["val_annotations"], images=tiny_dataset["val_images"], batch_size=4, num_workers=0,
    ), rank=0, world_size=1)
    keys = ("AP", "AP50", "AP75", "APs", "APm", "APl")
    assert direct["num_detections"] > 0
    assert {k: done["final_metrics"][k] for k in keys} == pytest.approx({k: direct[k] for k in keys})
    series = stack_api.get(f"/v1/jobs/{job['id']}/metrics")["series"]
    assert series["eval/AP"]["steps"] == [0] and series["eval/AP"]["values"] == pytest.approx([direct["AP"]])
    artifacts = {a["name"] for a in stack_api.get(f"/v1/jobs/{job['id']}/artifacts")}
    assert "metrics.json" in artifacts and done["output_model_id"] is None
    events = stack_api.http.get(f"/v1/jobs/{job['id']}/events").text
    assert "event: final" in events and events.index("event: final") < events.rindex("succeeded")
    stack_api.http.close()


def test_experiment_evaluates_a_teacher_without_ap_on_its_val_dataset(api):
    from service import leases

    train, val = api.register_dataset(), api.register_dataset()
    teacher = api.add_model({**TINY_MODEL, "norm": "bn", "fpn_channels": 32})  # uploaded: no AP anywhere
    body = {"teacher": {"model_id": teacher}, "student": {**TINY_MODEL, "norm": "bn"}, "train_dataset": train,
            "val_dataset": val, "hyperparameters": {"max_iters": 2, "batch_size": 1, "num_workers": 0}}
    r = api.post("/v1/experiments", json=body)
    assert r.status_code == 201, r.text
    exp = r.json()
    evaluation = api.get(f"/v1/jobs/{exp['jobs']['teacher']}").json()
    assert (evaluation["kind"], evaluation["init_model_id"], evaluation["val_dataset_id"]) == ("evaluate", teacher, val)
    assert exp["table"][0]["job_id"] == evaluation["id"] and exp["table"][0]["AP"] is None

    metrics = {"AP": 41.5, "AP50": 60.0, "AP75": 44.0, "APs": None, "APm": 40.0, "APl": 50.0}
    with api.session() as s:
        assert leases.claim_job(s, job_id=evaluation["id"], worker_id="w", lease_seconds=60) is not None
        assert leases.finish_job(s, job_id=evaluation["id"], worker_id="w", status="succeeded",
                                 final_metrics=metrics, final_step=0)
    row = api.get(f"/v1/experiments/{exp['id']}").json()["table"][0]
    assert row["role"] == "teacher" and row["model_id"] == teacher and row["status"] == "succeeded"
    assert {k: row[k] for k in metrics} == metrics and row["params"] > 0

    # a bad teacher: its evaluation's errors are located in the experiment's body, and nothing is created
    before = api.get("/v1/jobs").json()["total"]
    r = api.post("/v1/experiments", json={**body, "teacher": {"model_id": teacher}, "val_dataset": "nope"})
    assert ("body", "val_dataset") in locs(r) and api.get("/v1/jobs").json()["total"] == before


def test_detections_of_a_model_of_other_classes_are_relabelled_by_name(tmp_path):
    import torch

    from gid_core.classmap import match_classes
    from gid_core.config import TeacherClasses
    from gid_core.engine import eval_class_match

    match, problems = match_classes(["dog", "cat"], ["cat", "N/A", "dog", "horse"])
    assert problems == [] and not match.identity
    out = match.relabel({"boxes": torch.zeros(4, 4), "scores": torch.tensor([0.9, 0.8, 0.7, 0.6]),
                         "labels": torch.tensor([1, 2, 3, 4])})
    assert out["labels"].tolist() == [2, 1] and out["scores"].tolist() == pytest.approx([0.9, 0.7])

    categories = [{"id": 7, "name": "dog"}, {"id": 9, "name": "cat"}]
    cfg = EvalConfig(model=ModelConfig(**{**TINY_MODEL, "num_classes": 4}), annotations=tmp_path, images=tmp_path,
                     model_classes=TeacherClasses(categories=["cat", "N/A", "dog", "horse"]))
    assert eval_class_match(cfg, categories) == match
    lacking = cfg.model_copy(update={"model_classes": TeacherClasses(categories=["cat", "N/A", "cow", "horse"])})
    with pytest.raises(Exception, match="lack") as e:
        eval_class_match(lacking, categories)
    assert e.value.problems[0].loc[0] == "model_classes"


@pytest.mark.slow
def test_cancelled_evaluation_stops_at_once(stack, tiny_dataset, tmp_path):
    """An evaluation has no checkpoint to save: the supervisor kills it when it sees the request,
    not after ``cancel_grace_seconds`` (20 s in this stack)."""
    import time

    stack_api = StackApi(stack)
    stack_api.post("/v1/datasets", json={"name": "eval-slow", "annotations": tiny_dataset["val_annotations"],
                                         "images": tiny_dataset["val_images"]})
    _upload_detecting_model(stack_api, tmp_path, name="eval-slow-model")
    # 1333 px inputs keep the child busy for far longer than the heartbeat (1 s) it is cancelled within
    job = stack_api.post("/v1/jobs", json={"kind": "evaluate", "model_id": "eval-slow-model", "dataset": "eval-slow",
                                           "batch_size": 1, "min_size": 1333, "max_size": 1333})
    deadline = time.monotonic() + 120
    while stack_api.get(f"/v1/jobs/{job['id']}")["status"] == "queued":
        assert time.monotonic() < deadline, "the evaluation never started"
        time.sleep(0.1)
    requested = time.monotonic()
    stack_api.post(f"/v1/jobs/{job['id']}/cancel", expect=200)
    done = stack_api.wait_terminal(job["id"], timeout=60)
    assert done["status"] == "cancelled", done
    assert time.monotonic() - requested < 10, "waited for the cancel grace period"
    stack_api.http.close()
