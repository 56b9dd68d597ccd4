"""End to end: synthetic data -> teacher -> GID student -> COCOeval -> export -> reload."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gid_core.config import DataConfig, EvalConfig, Hyperparameters, JobConfig, ModelConfig, SyntheticDatasetConfig
from gid_core.data import CocoDetectionDataset
from gid_core.engine import load_model_for_eval, run_evaluation, run_job
from gid_core.export import load_export
from gid_core.synthetic import make_synthetic_dataset


def model(fpn_channels: int, weights: str | None = None) -> ModelConfig:
    # Anchors 8..128 suit 64 px images with objects of ~10-40 px.
    return ModelConfig(arch="retinanet", backbone="resnet18", num_classes=2, fpn_channels=fpn_channels, norm="gn",
                       min_size=64, max_size=64, anchor_sizes=[8, 16, 32, 64, 128], weights=weights)


@pytest.mark.slow
def test_teacher_then_distilled_student_then_export(tmp_path):
    info = make_synthetic_dataset(SyntheticDatasetConfig(output_dir=tmp_path / "data", num_train=16, num_val=4,
                                                         image_size=64, num_classes=2, min_objects=1, max_objects=2))
    data = DataConfig(train_annotations=info["train_annotations"], train_images=info["train_images"],
                      val_annotations=info["val_annotations"], val_images=info["val_images"])
    hp = dict(batch_size=4, lr=0.01, warmup_iters=10, num_workers=0, log_period=10, checkpoint_period=1000)

    teacher_job = JobConfig(kind="train", student=model(64), data=data,
                            hyperparameters=Hyperparameters(max_iters=40, eval_period=20, **hp))
    teacher = run_job(teacher_job, output_dir=tmp_path / "teacher")
    assert teacher["status"] == "completed" and teacher["iterations"] == 40
    log = [json.loads(line) for line in (tmp_path / "teacher" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["total_loss"] < log[0]["total_loss"]  # the teacher learned something
    assert "eval/AP" in log[1] and "eval/AP" not in log[0]  # eval_period=20: reported at 20
    assert set(teacher["metrics"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_category"}
    assert set(teacher["metrics"]["per_category"]) == {"digit_0", "digit_1"}

    teacher_weights = str(Path(teacher["export_dir"]) / "model.safetensors")
    student_job = JobConfig(kind="distill", student=model(32), teacher=model(64, teacher_weights), data=data,
                            hyperparameters=Hyperparameters(max_iters=20, **hp))
    student = run_job(student_job, output_dir=tmp_path / "student")
    assert student["status"] == "completed"
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(student["metrics"]))
    assert 0.0 <= metrics["AP"] <= 100.0 and metrics["num_images"] == 4

    # The export is the student alone; it loads into a fresh torchvision RetinaNet and predicts
    # exactly what the trained student (from the final checkpoint) predicts.
    exported, meta = load_export(student["export_dir"])
    assert meta["torchvision_class"] == "torchvision.models.detection.RetinaNet"
    assert meta["training_config"]["kind"] == "distill" and meta["metrics"] == metrics
    assert [c["name"] for c in meta["categories"]] == ["digit_0", "digit_1"]
    ckpt = sorted((tmp_path / "student" / "checkpoints").glob("ckpt_*.pt"))[-1]
    trained = load_model_for_eval(model(32, str(ckpt))).eval()
    val = CocoDetectionDataset(info["val_annotations"], info["val_images"], min_size=64, max_size=64)
    images = [val[i][0] for i in range(len(val))]
    with torch.no_grad():
        expected, got = trained(images), exported(images)
    assert sum(len(p["boxes"]) for p in got) > 0
    for a, b in zip(expected, got):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key])

    # Evaluating the export standalone reproduces the job's final metrics.
    again = run_evaluation(EvalConfig(model=model(32, student["export_dir"]), annotations=info["val_annotations"],
                                      images=info["val_images"], batch_size=2, num_workers=0))
    assert {k: again[k] for k in ("AP", "AP50", "AP75")} == {k: metrics[k] for k in ("AP", "AP50", "AP75")}
