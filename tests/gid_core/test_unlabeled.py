"""Distillation on unlabeled images (issue #12 item 2): GID losses only on unlabeled batches, the
labeled/unlabeled mix over steps, validation of image-only sets, and exact resume of the mix."""

from __future__ import annotations

import json
import os

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from gid_core.config import DataConfig, DistillConfig, Hyperparameters, JobConfig, SyntheticDatasetConfig
from gid_core.data import CocoDetectionDataset, collate_detection
from gid_core.distill import GIDDistiller
from gid_core.engine import run_job
from gid_core.models import build_detector, save_state_dict_file
from gid_core.synthetic import make_synthetic_dataset
from gid_core.trainer import HookBase
from gid_core.unlabeled import UnlabeledImageDataset, is_unlabeled_step, validate_unlabeled_images

from tests.gid_core.test_checkpoint import student_config, teacher_config

GT_KEYS = {"classification", "bbox_regression"}  # RetinaNet's ground-truth losses


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unlabeled")
    info = make_synthetic_dataset(SyntheticDatasetConfig(output_dir=root, num_train=4, num_val=4, image_size=64,
                                                         num_classes=3, max_objects=3))
    torch.manual_seed(0)
    save_state_dict_file(build_detector(teacher_config(None)).state_dict(), root / "teacher.safetensors")
    info["teacher"] = str(root / "teacher.safetensors")
    # an image-only COCO file: the val images, no annotations or categories
    listing = json.loads(open(info["val_annotations"]).read())
    (root / "unlabeled.json").write_text(json.dumps({"images": listing["images"]}))
    info["unlabeled_annotations"] = str(root / "unlabeled.json")
    return info


def distill_job(info: dict, *, folder: bool = True, **hp) -> JobConfig:
    defaults = dict(max_iters=4, batch_size=2, lr=0.01, warmup_iters=2, num_workers=0, flip_prob=0.5,
                    log_period=1, checkpoint_period=100, schedule="step", steps=[0.5], unlabeled_ratio=0.5)
    return JobConfig(
        kind="distill", student=student_config(), teacher=teacher_config(info["teacher"]),
        data=DataConfig(train_annotations=info["train_annotations"], train_images=info["train_images"],
                        unlabeled_images=info["val_images"],
                        unlabeled_annotations=None if folder else info["unlabeled_annotations"]),
        hyperparameters=Hyperparameters(**{**defaults, **hp}),
    )


def read_log(out) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return {r["iteration"]: r for r in rows}


def test_schedule_is_exact_and_even():
    for ratio in (0.0, 0.25, 0.5, 1 / 3, 0.9):
        flags = [is_unlabeled_step(s, ratio) for s in range(120)]
        for n in range(121):
            assert sum(flags[:n]) == int(n * ratio + 1e-9) or sum(flags[:n]) == int(n * ratio)
    assert [is_unlabeled_step(s, 0.5) for s in range(4)] == [False, True, False, True]


def test_unlabeled_batch_gives_gid_losses_and_no_gt_loss(data):
    torch.manual_seed(0)
    teacher = build_detector(teacher_config(None))
    student = build_detector(student_config())
    ds = UnlabeledImageDataset(data["val_images"], min_size=64, max_size=64)
    images = [ds[i][0] for i in range(2)]
    labeled = CocoDetectionDataset(data["train_annotations"], data["train_images"], min_size=64, max_size=64)
    l_images, l_targets = collate_detection([labeled[i] for i in range(2)])

    distiller = GIDDistiller(teacher, student, DistillConfig()).train()
    losses = distiller(images, None)
    assert {"loss_feature", "loss_relation", "loss_response_cls", "loss_response_reg"} <= set(losses)
    assert not GT_KEYS & set(losses)
    assert GT_KEYS <= set(distiller(l_images, l_targets))

    # Distillation switched off: an unlabeled batch leaves every student gradient zero (no GT loss
    # reaches it), though each parameter has one (DDP needs them); a labeled batch does not.
    off = GIDDistiller(teacher, student, DistillConfig(use_feature=False, use_relation=False,
                                                       use_response=False)).train()
    sum(off(images, None).values()).backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and all(torch.count_nonzero(g) == 0 for g in grads)
    student.zero_grad(set_to_none=True)
    sum(off(l_images, l_targets).values()).backward()
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in student.parameters())


def test_labeled_and_unlabeled_steps_mix_as_configured(data, tmp_path):
    job = distill_job(data, folder=False, max_iters=6, unlabeled_ratio=1 / 3)
    assert run_job(job, output_dir=tmp_path)["status"] == "completed"
    log = read_log(tmp_path)
    for it in range(1, 7):  # row `it` is step it - 1; steps 2 and 5 are unlabeled
        unlabeled = is_unlabeled_step(it - 1, 1 / 3)
        assert unlabeled == (it in (3, 6))
        assert (GT_KEYS & set(log[it]) == set()) == unlabeled, it
        assert "loss_relation" in log[it] and "gi/gi_per_image" in log[it]
    state = torch.load(tmp_path / "checkpoints" / "ckpt_0000006.pt", weights_only=True)["data"]
    # 4 labeled batches of 2 (2 per epoch of 4 images) and 2 unlabeled ones (2 per epoch of 4 images)
    assert state == {"labeled": {"epoch": 1, "offset": 2}, "unlabeled": {"epoch": 0, "offset": 2}, "step": 6}


class StopAt(HookBase):
    def __init__(self, iteration: int) -> None:
        self.iteration = iteration

    def after_step(self) -> None:
        if self.trainer.iter == self.iteration:
            self.trainer.request_stop()


def test_resume_with_unlabeled_stream_equals_uninterrupted_run(data, tmp_path):
    job = distill_job(data, max_iters=5)
    straight = run_job(job, output_dir=tmp_path / "a")
    assert straight["status"] == "completed" and straight["iterations"] == 5
    assert run_job(job, output_dir=tmp_path / "b", hooks=[StopAt(3)])["status"] == "cancelled"
    second = run_job(job, output_dir=tmp_path / "b")
    assert second["status"] == "completed" and second["start_iteration"] == 3

    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert sorted(log_b) == list(range(1, 6))
    for it in range(1, 6):
        assert log_a[it].keys() == log_b[it].keys()
        for key in [k for k in log_a[it] if k.startswith("loss") or k in GT_KEYS | {"total_loss", "lr"}]:
            assert log_b[it][key] == pytest.approx(log_a[it][key], rel=1e-5, abs=1e-7), (it, key)
    wa = load_file(str(tmp_path / "a" / "export" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "export" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)


def test_image_only_sets_validate_and_refuse_links(data, tmp_path):
    records, problems = validate_unlabeled_images(data["val_images"])
    assert problems == [] and len(records) == 4
    coco, problems = validate_unlabeled_images(data["val_images"], data["unlabeled_annotations"])
    assert problems == [] and sorted(coco) == sorted(records)

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "notes.txt").write_text("not an image")
    _, problems = validate_unlabeled_images(folder)
    assert [p.loc for p in problems] == [("images",)] and "no image files" in problems[0].message
    first = sorted(os.listdir(data["val_images"]))[0]
    os.symlink(os.path.join(data["val_images"], first), folder / "link.png")
    _, problems = validate_unlabeled_images(folder)  # a link is no image of the folder
    assert "no image files" in problems[0].message
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps({"images": [{"id": 1, "file_name": "link.png", "width": 64, "height": 64}]}))
    _, problems = validate_unlabeled_images(folder, listing)
    assert problems[0].code == "unsafe_image_file"


def test_unlabeled_images_only_for_distillation(data):
    job = distill_job(data).model_dump()
    job.update(kind="train", teacher=None)
    with pytest.raises(ValidationError) as e:
        JobConfig(**job)
    assert [err["loc"] for err in e.value.errors()] == [("data", "unlabeled_images")]
    with pytest.raises(ValidationError, match="needs unlabeled_images"):
        DataConfig(train_annotations="a.json", train_images="i", unlabeled_annotations="u.json")
