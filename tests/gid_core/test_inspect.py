"""GIInspector: the GIs GISM picks at a checkpoint, with each one's teacher and student box."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from gid_core.config import DataConfig, Hyperparameters, JobConfig, ModelConfig, SyntheticDatasetConfig
from gid_core.distill import GIDDistiller
from gid_core.gism import select_general_instances
from gid_core.inspect import GIInspector, student_state
from gid_core.models import build_detector, save_state_dict_file
from gid_core.synthetic import make_synthetic_dataset


def model(fpn_channels: int, weights: str | None = None) -> ModelConfig:
    return ModelConfig(arch="retinanet", backbone="resnet18", num_classes=2, fpn_channels=fpn_channels,
                       min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128], weights=weights)


@pytest.fixture(scope="module")
def job_and_checkpoint(tmp_path_factory) -> tuple[JobConfig, Path]:
    tmp = tmp_path_factory.mktemp("inspect")
    info = make_synthetic_dataset(SyntheticDatasetConfig(output_dir=tmp / "data", num_train=2, num_val=3,
                                                         image_size=64, num_classes=2, max_objects=2))
    torch.manual_seed(0)
    save_state_dict_file(build_detector(model(32), load_weights=False).state_dict(), tmp / "teacher.safetensors")
    data = DataConfig(train_annotations=info["train_annotations"], train_images=info["train_images"],
                      val_annotations=info["val_annotations"], val_images=info["val_images"])
    job = JobConfig(kind="distill", student=model(16), teacher=model(32, str(tmp / "teacher.safetensors")),
                    data=data, hyperparameters=Hyperparameters(max_iters=1, num_workers=0))
    distiller = GIDDistiller(build_detector(job.teacher), build_detector(job.student, load_weights=False))
    ckpt = tmp / "ckpt_0000001.pt"
    torch.save({"iteration": 1, "model": distiller.state_dict()}, ckpt)  # the trainer's layout
    return job, ckpt


def test_general_instances_are_the_engines_selection_with_both_boxes(job_and_checkpoint):
    job, ckpt = job_and_checkpoint
    inspector = GIInspector.from_job(job, ckpt)
    assert len(inspector) == 3 and inspector.categories == ["digit_0", "digit_1"]
    view = inspector.inspect(1, score_threshold=0.0, max_detections=5)
    gis = view["general_instances"]
    assert 0 < len(gis) <= job.hyperparameters.distill.top_k
    assert [g["score"] for g in gis] == sorted((g["score"] for g in gis), reverse=True)
    for g in gis:
        assert g["box"] == g[f"{g['source']}_box"]  # the more confident detector's box
        assert abs(g["teacher_prob"] - g["student_prob"]) == pytest.approx(g["score"], abs=2e-4)
        assert 1 <= g["label"] <= 2
    assert len(view["teacher"]) <= 5 and len(view["student"]) <= 5
    assert (view["width"], view["height"]) == (64, 64)

    # The same picks as the single-image GISM run independently on the same dense outputs.
    d = inspector.distiller
    image, _ = inspector.dataset[1]
    images, _ = d.student.transform([image])
    t, s = d.view(d.teacher, images, d._anchors), d.view(d.student, images, d._anchors)
    cfg = job.hyperparameters.distill
    boxes, scores = select_general_instances(t.probs[0], t.boxes[0], s.probs[0], s.boxes[0], top_k=cfg.top_k,
                                             nms_iou=cfg.nms_iou, min_size=d.gi_min_box_size)
    assert [g["score"] for g in gis] == [round(float(x), 4) for x in scores]
    assert [g["box"] for g in gis] == [[round(float(v), 2) for v in b] for b in boxes]  # 64 px in, 64 px out

    png = Image.open(io.BytesIO(inspector.image_png(1)))
    assert png.size == (64, 64) and png.format == "PNG"


def test_export_weights_load_too(job_and_checkpoint, tmp_path):
    job, ckpt = job_and_checkpoint
    save_state_dict_file(student_state(ckpt), tmp_path / "model.safetensors")
    from_export = GIInspector.from_job(job, tmp_path / "model.safetensors").inspect(0)
    assert from_export == GIInspector.from_job(job, ckpt).inspect(0)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_checkpoint_with_code_is_refused_and_not_a_distill_job(job_and_checkpoint, tmp_path):
    job, _ = job_and_checkpoint
    evil = tmp_path / "ckpt_0000002.pt"
    torch.save({"model": {}, "x": _Evil()}, evil)
    with pytest.raises(pickle.UnpicklingError):
        student_state(evil)
    with pytest.raises(ValueError, match="distillation jobs"):
        GIInspector.from_job(job.model_copy(update={"kind": "train", "teacher": None}), evil)


TEACHER = ["cat", "dog", "person", "car", "bus"]  # teacher labels 1..5
DATASET = ["car", "person", "dog"]  # dataset labels 1..3: teacher labels 4, 3, 2


def test_a_teacher_of_other_classes_is_matched_as_in_training(tmp_path):
    info = make_synthetic_dataset(SyntheticDatasetConfig(output_dir=tmp_path / "data", num_train=1, num_val=2,
                                                         image_size=64, num_classes=3, max_objects=2))
    val = Path(info["val_annotations"])
    coco = json.loads(val.read_text())
    for category, name in zip(coco["categories"], DATASET):
        category["name"] = name
    val.write_text(json.dumps(coco))
    torch.manual_seed(1)
    teacher_cfg = model(32, str(tmp_path / "teacher.safetensors")).model_copy(update={"num_classes": 5})
    save_state_dict_file(build_detector(teacher_cfg, load_weights=False).state_dict(), teacher_cfg.weights)
    student_cfg = model(16).model_copy(update={"num_classes": 3})
    save_state_dict_file(build_detector(student_cfg, load_weights=False).state_dict(), tmp_path / "student.safetensors")
    data = DataConfig(train_annotations=info["train_annotations"], train_images=info["train_images"],
                      val_annotations=val, val_images=info["val_images"])
    job = JobConfig(kind="distill", student=student_cfg, teacher=teacher_cfg, teacher_classes={"categories": TEACHER},
                    data=data, hyperparameters=Hyperparameters(max_iters=1, num_workers=0))

    inspector = GIInspector.from_job(job, tmp_path / "student.safetensors")
    assert inspector.categories == DATASET
    view = inspector.inspect(0, score_threshold=0.0)
    gis = view["general_instances"]
    assert gis and all(1 <= g["label"] <= 3 for g in gis)

    # Independently: the teacher's columns of car, person, dog (labels 4, 3, 2) against the student's 1..3.
    d = inspector.distiller
    image, _ = inspector.dataset[0]
    images, _ = d.student.transform([image])
    t, s = d.view(d.teacher, images, d._anchors), d.view(d.student, images, d._anchors)
    t_prob = t.probs[0][:, [3, 2, 1]]
    cfg = job.hyperparameters.distill
    boxes, scores = select_general_instances(t_prob, t.boxes[0], s.probs[0], s.boxes[0], top_k=cfg.top_k,
                                             nms_iou=cfg.nms_iou, min_size=d.gi_min_box_size)
    assert [g["score"] for g in gis] == [round(float(x), 4) for x in scores]
    for g in gis:  # each GI's probabilities are the teacher's column of its dataset class
        assert abs(g["teacher_prob"] - g["student_prob"]) == pytest.approx(g["score"], abs=2e-4)
