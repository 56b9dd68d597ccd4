"""Issue #9, done-when: over REST on the CPU, a stand-in of torchvision's COCO RetinaNet (by weights
name) is distilled into a ResNet-18 student with an ImageNet-backbone stand-in, on a dataset of 3 of
COCO's classes in its own order and ids; the export loads in plain torchvision.

All real parts (``gid up``'s stack: Redis, the API under uvicorn, a Celery worker and its training
child). The stand-ins are torchvision's builders with ``weights=None``, saved under torchvision's
file names in the service's ``TORCH_HOME``: nothing is downloaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import load_file
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from gid.embedded import EmbeddedStack
from gid_core.config import SyntheticDatasetConfig
from gid_core.processes import free_port
from gid_core.synthetic import make_synthetic_dataset
from gid_core.weights import lookup
from service.models import Job
from tests.service.helpers import TINY_MODEL
from tests.worker.conftest import STACK_ENV
from tests.worker.helpers import Api, tiny_hyperparameters

TEACHER = "torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"
BACKBONE = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
# 3 of COCO's classes under the dataset's own ids: label order (by id) is dog, person, car
CATEGORIES = [{"id": 5, "name": "dog"}, {"id": 9, "name": "person"}, {"id": 12, "name": "car"}]
SIZE = 64


def _stand_in(torch_home: Path, name: str, model: torch.nn.Module) -> None:
    path = torch_home / "hub" / "checkpoints" / lookup(name, kind="detector" if "RetinaNet" in name else "backbone").file_name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[EmbeddedStack]:
    root = tmp_path_factory.mktemp("coco-teacher")
    torch_home = root / "torch"
    torch.manual_seed(0)
    _stand_in(torch_home, TEACHER, torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None))
    _stand_in(torch_home, BACKBONE, torchvision.models.resnet18(weights=None))
    s = EmbeddedStack(root / "data", port=free_port(), extra_env={**STACK_ENV, "GID_TORCH_HOME": str(torch_home)},
                      startup_timeout=180)
    s.start()
    yield s
    s.stop()


def _coco_subset(stack: EmbeddedStack) -> Path:
    """A tiny synthetic dataset whose 3 categories are renamed to COCO names with other ids."""
    files = make_synthetic_dataset(SyntheticDatasetConfig(
        output_dir=stack.data_dir / "synthetic", num_train=4, num_val=2, image_size=SIZE, num_classes=3,
        max_objects=2, seed=0,
    ))
    new_id = {c: CATEGORIES[c - 1]["id"] for c in (1, 2, 3)}
    for split in ("train", "val"):
        path = Path(files[f"{split}_annotations"])
        data = json.loads(path.read_text())
        data["categories"] = CATEGORIES
        for ann in data["annotations"]:
            ann["category_id"] = new_id[ann["category_id"]]
        path.write_text(json.dumps(data))
    return files


def test_torchvision_coco_teacher_into_own_classes_over_rest(stack):
    api = Api(stack)
    files = _coco_subset(stack)
    ids = {split: api.post("/v1/datasets", json={"name": f"coco3-{split}", "annotations": str(files[f"{split}_annotations"]),
                                                  "images": str(files[f"{split}_images"])})["id"]
           for split in ("train", "val")}
    student = {"arch": "retinanet", "backbone": "resnet18", "num_classes": 3, "fpn_channels": 256,
               "min_size": SIZE, "max_size": SIZE, "backbone_weights": BACKBONE}
    body = {"kind": "distill", "name": "coco-teacher", "student": student, "teacher": {"weights": TEACHER},
            "train_dataset": ids["train"], "val_dataset": ids["val"],
            "hyperparameters": tiny_hyperparameters(max_iters=2, log_period=1, checkpoint_period=2)}

    # a class the COCO teacher lacks is refused at submission, naming the class and the field
    bad = {**body, "teacher": {"weights": TEACHER, "class_map": {"dog": "unicorn"}}}
    r = api.http.post("/v1/jobs", json=bad)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "teacher", "class_map", "dog"] and "unicorn" in error["msg"]

    job = api.post("/v1/jobs", json=body)
    job = api.wait_terminal(job["id"], timeout=240)
    assert job["status"] == "succeeded", (job, (stack.logs_dir / "worker.log").read_text()[-4000:])

    # the export: the student of the dataset's classes, loading in plain torchvision
    model_row = api.get(f"/v1/models/{job['output_model_id']}")
    assert model_row["categories"] == ["dog", "person", "car"]
    weights = api.http.get(f"/v1/jobs/{job['id']}/artifacts/model.safetensors")
    assert weights.status_code == 200, weights.text
    path = stack.data_dir / "student.safetensors"
    path.write_bytes(weights.content)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=3,
                                   returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(256, 256))
    stock = RetinaNet(backbone, num_classes=4, min_size=SIZE, max_size=SIZE)
    missing, unexpected = stock.load_state_dict(load_file(str(path)), strict=True)
    assert not missing and not unexpected
    with torch.no_grad():
        (pred,) = stock.eval()([torch.rand(3, SIZE, SIZE)])
    assert set(pred) == {"boxes", "scores", "labels"}
    api.http.close()


# --------------------------------------------------------------------------- submission (TestClient)

FIVE = ["cat", "dog", "person", "car", "bus"]


def _submit(api, dataset: list[str], teacher_categories: list[str] | None, **teacher):
    model = api.add_model({**TINY_MODEL, "num_classes": len(teacher_categories or dataset)}, categories=teacher_categories)
    body = {"kind": "distill", "student": {**TINY_MODEL, "num_classes": len(dataset)},
            "teacher": {"model_id": model, **teacher}, "train_dataset": api.register_dataset(names=dataset),
            "hyperparameters": {"max_iters": 4, "batch_size": 2}}
    return api.post("/v1/jobs", json=body)


def test_uploaded_teacher_of_other_classes_matches_by_name(api):
    r = _submit(api, ["car", "person", "dog"], FIVE)
    assert r.status_code == 201, r.text
    with api.session() as s:
        engine = s.get(Job, r.json()["id"]).engine_config
    assert engine["teacher"]["num_classes"] == 5 and engine["student"]["num_classes"] == 3
    assert engine["teacher_classes"] == {"categories": FIVE, "class_map": None, "allow_missing_classes": False}


def test_classes_the_teacher_lacks_are_named_at_submission(api):
    r = _submit(api, ["car", "zebra", "dog"], FIVE)
    assert r.status_code == 422, r.text
    [error] = r.json()["detail"]
    assert error["loc"] == ["body", "teacher", "model_id"] and "zebra" in error["msg"]
    assert _submit(api, ["car", "zebra", "dog"], FIVE, allow_missing_classes=True).status_code == 201

    r = _submit(api, ["car", "zebra", "dog"], FIVE, class_map={"zebra": "unicorn", "lion": "cat"})
    assert r.status_code == 422, r.text
    assert {tuple(e["loc"]) for e in r.json()["detail"]} == {
        ("body", "teacher", "class_map", "zebra"), ("body", "teacher", "class_map", "lion"),
    }


def test_class_map_needs_a_teacher_of_known_categories(api):
    r = _submit(api, ["a", "b"], None, class_map={"a": "b"})
    assert r.status_code == 422, r.text
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "teacher", "class_map"]]
    assert _submit(api, ["a", "b"], None).status_code == 201  # unknown categories: the count rule
