"""A teacher with other classes (issue #9, item 4): classes matched by name, and GISM's score and the
response loss read the teacher's columns of the matched classes only.

The expectations are computed independently, element by element with ``math`` on hand-built logits,
never through the code under test."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gid_core.classmap import ClassMatch, class_match_for, class_match_problems, match_classes
from gid_core.config import DistillConfig, JobConfig, ModelConfig, TeacherClasses
from gid_core.dense import DenseOutputs
from gid_core.distill import GIDDistiller
from gid_core.engine import JobSetupError, check_job_inputs
from gid_core.gism import select_general_instances_batched
from gid_core.losses import response_loss
from gid_core.models import build_detector
from gid_core.weights import categories_for

TEACHER = ["cat", "dog", "person", "car", "bus"]  # teacher labels 1..5
DATASET = ["car", "person", "dog"]  # dataset labels 1..3: 3 of them, in another order
# written out by hand: dataset label -> teacher label
BY_HAND = {1: 4, 2: 3, 3: 2}


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bce(logit: float, target: float) -> float:
    p = sigmoid(logit)
    return -(target * math.log(p) + (1.0 - target) * math.log(1.0 - p))


def _outputs(logits: torch.Tensor, num_classes: int, extra: int = 0) -> DenseOutputs:
    """A RetinaNet-style (extra=0) or FCOS-style (extra=1: centerness) dense output."""
    n, r, _ = logits.shape
    boxes = torch.arange(n * r, dtype=torch.float32).mul(20.0).view(n, r, 1)
    boxes = torch.cat([boxes, torch.zeros_like(boxes), boxes + 10.0, torch.full_like(boxes, 10.0)], -1)
    return DenseOutputs(
        features=[], probs=logits[..., 1:num_classes + 1].sigmoid(), boxes=boxes, logits=logits,
        reg=torch.zeros(n, r, 4),
    )


def _logits(columns: int, seed: int) -> torch.Tensor:
    return torch.randn(2, 6, columns, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_names_match_in_the_datasets_order():
    match, problems = match_classes(DATASET, TEACHER)
    assert problems == [] and match.missing == ()
    assert dict(zip(match.student_labels, match.teacher_labels)) == BY_HAND
    assert not match.identity
    same, _ = match_classes(TEACHER, TEACHER)
    assert same.identity


def test_gism_scores_use_the_matched_teacher_columns_only():
    t_logits, s_logits = _logits(6, 0), _logits(4, 1)  # teacher: 0 + 5 classes; student: 0 + 3
    match, _ = match_classes(DATASET, TEACHER)
    t, s = match.restrict(_outputs(t_logits, 5), _outputs(s_logits, 3))
    expected = [
        [max(abs(sigmoid(t_logits[n, r, BY_HAND[d]].item()) - sigmoid(s_logits[n, r, d].item())) for d in (1, 2, 3))
         for r in range(6)]
        for n in range(2)
    ]
    # boxes are disjoint: NMS keeps every prediction, so GISM returns every score, descending
    selected = select_general_instances_batched(t.probs, t.boxes, s.probs, s.boxes, top_k=6, nms_iou=0.3)
    for n, (_, scores) in enumerate(selected):
        assert scores.tolist() == pytest.approx(sorted(expected[n], reverse=True), abs=1e-6)


@pytest.mark.parametrize("extra", [0, 1], ids=["retinanet", "fcos_centerness"])
def test_response_loss_uses_the_matched_teacher_columns_only(extra):
    t_logits, s_logits = _logits(6 + extra, 2), _logits(4 + extra, 3)
    mask = torch.tensor([[True, False, True, True, False, False], [False, True, False, False, False, True]])
    match, _ = match_classes(DATASET, TEACHER)
    t, s = match.restrict(_outputs(t_logits, 5, extra), _outputs(s_logits, 3, extra))
    cls, _ = response_loss(t.logits, s.logits, t.reg, s.reg, mask)

    pairs = [(0, 0), *((d, BY_HAND[d]) for d in (1, 2, 3))] + ([(4, 6)] if extra else [])  # (student, teacher)
    total = sum(
        bce(s_logits[n, r, sc].item(), sigmoid(t_logits[n, r, tc].item()))
        for n in range(2) for r in range(6) if mask[n, r] for sc, tc in pairs
    )
    assert cls.item() == pytest.approx(total / mask.sum().item(), rel=1e-9)


def test_a_missing_class_leaves_the_score_and_the_response_loss():
    dataset = ["car", "zebra", "dog"]
    match, problems = match_classes(dataset, TEACHER)
    assert problems == [] and match.missing == ("zebra",)
    assert (match.student_labels, match.teacher_labels) == ((1, 3), (4, 2))
    t_logits, s_logits = _logits(6, 4), _logits(4, 5)
    t, s = match.restrict(_outputs(t_logits, 5), _outputs(s_logits, 3))
    assert s.probs.shape[-1] == t.probs.shape[-1] == 2
    score = (t.probs - s.probs).abs().amax(-1)
    by_hand = max(abs(sigmoid(t_logits[0, 0, 4].item()) - sigmoid(s_logits[0, 0, 1].item())),
                  abs(sigmoid(t_logits[0, 0, 2].item()) - sigmoid(s_logits[0, 0, 3].item())))
    assert score[0, 0].item() == pytest.approx(by_hand)

    [problem] = class_match_problems(dataset, TEACHER, None)
    assert problem.loc == ("teacher_classes", "categories") and problem.code == "class_missing"
    assert "zebra" in problem.message
    assert class_match_problems(dataset, TEACHER, TeacherClasses(allow_missing_classes=True)) == []
    [none_left] = class_match_problems(["zebra"], TEACHER, TeacherClasses(allow_missing_classes=True))
    assert none_left.loc == ("teacher_classes", "allow_missing_classes")


def test_class_map_overrides_names_and_its_mistakes_are_located():
    classes = TeacherClasses(class_map={"automobile": "car", "puppy": "dog"})
    match, problems = match_classes(["automobile", "person", "puppy"], TEACHER, classes.class_map)
    assert problems == [] and dict(zip(match.student_labels, match.teacher_labels)) == BY_HAND
    bad = TeacherClasses(class_map={"truck": "car", "person": "human"})
    problems = class_match_problems(["person"], TEACHER, bad)
    assert {(p.loc, p.code) for p in problems} == {
        (("teacher_classes", "class_map", "truck"), "unknown_class"),
        (("teacher_classes", "class_map", "person"), "unknown_class"),  # not reported missing as well
    }


def test_torchvision_coco_names_skip_placeholders():
    coco = categories_for("torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    assert len(coco) == 90 and coco.count("N/A") > 1  # placeholders repeat, yet are not ambiguous
    match, problems = match_classes(["dog", "person", "car", "N/A"], coco)
    assert problems == [] and match.missing == ("N/A",)
    assert dict(zip(match.student_labels, match.teacher_labels)) == {1: 18, 2: 1, 3: 3}  # COCO's ids


def test_softmax_heads_fold_unmatched_classes_into_background():
    t_logits, s_logits = _logits(6, 6), _logits(4, 7)
    match, _ = match_classes(DATASET, TEACHER)
    t, s = match.restrict_softmax(t_logits, s_logits)
    p = [[[math.exp(v) for v in row] for row in image] for image in t_logits.tolist()]
    for n in range(2):
        for r in range(6):
            z = sum(p[n][r])
            background = (p[n][r][0] + p[n][r][1] + p[n][r][5]) / z  # background, cat, bus
            want = [background, *(p[n][r][BY_HAND[d]] / z for d in (1, 2, 3))]
            assert t[n, r].softmax(-1).tolist() == pytest.approx(want, rel=1e-9)
    assert torch.equal(s, s_logits)  # no missing class: the student keeps every column


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_distiller_with_a_teacher_of_other_classes_runs(arch):
    torch.manual_seed(0)
    size = 64
    common = dict(arch=arch, backbone="resnet18", fpn_channels=64, min_size=size, max_size=size)
    teacher = build_detector(ModelConfig(**common, num_classes=len(TEACHER)))
    student = build_detector(ModelConfig(**common, num_classes=len(DATASET)))
    match, _ = match_classes(DATASET, TEACHER)
    distiller = GIDDistiller(teacher, student, DistillConfig(), classes=match).train()
    images = [torch.rand(3, size, size) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([2])}] * 2
    losses = distiller(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    with pytest.raises((ValueError, RuntimeError)):  # without the match the columns cannot be compared
        GIDDistiller(teacher, student, DistillConfig()).train()(images, targets)


# --------------------------------------------------------------------------- job validation


def _dataset(tmp_path, names: list[str]) -> dict:
    (tmp_path / "images").mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    annotations = {
        "images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}],
        "categories": [{"id": 7 + i, "name": n} for i, n in enumerate(names)],
    }
    (tmp_path / "train.json").write_text(json.dumps(annotations))
    return {"train_annotations": tmp_path / "train.json", "train_images": tmp_path / "images"}


def _job(data: dict, classes: dict | None, teacher_classes: int = 5) -> JobConfig:
    model = dict(arch="retinanet", backbone="resnet18", fpn_channels=32)
    return JobConfig(
        kind="distill", student={**model, "num_classes": 3}, data=data, teacher_classes=classes,
        teacher={**model, "num_classes": teacher_classes, "weights": "teacher.safetensors"},
    )


def test_job_checks_match_classes_by_name(tmp_path):
    data = _dataset(tmp_path, ["car", "zebra", "dog"])
    with pytest.raises(JobSetupError) as info:
        check_job_inputs(_job(data, {"categories": TEACHER}))
    [problem] = info.value.problems
    assert problem.loc == ("teacher_classes", "categories") and "zebra" in problem.message
    allowed = _job(data, {"categories": TEACHER, "allow_missing_classes": True})
    check_job_inputs(allowed)
    match = class_match_for(allowed.teacher, allowed.teacher_classes, ["car", "zebra", "dog"])
    assert match == ClassMatch((1, 3), (4, 2), 3, 5, ("zebra",))
    with pytest.raises(JobSetupError) as info:  # categories that do not fit the teacher's outputs
        check_job_inputs(_job(data, {"categories": TEACHER[:4], "allow_missing_classes": True}))
    assert [p.loc for p in info.value.problems] == [("teacher_classes", "categories")]


def test_count_rule_holds_only_for_teachers_of_unknown_categories(tmp_path):
    data = _dataset(tmp_path, DATASET)
    with pytest.raises(ValueError, match="teacher.num_classes"):
        _job(data, None)
    _job(data, {"categories": TEACHER})
    with pytest.raises(ValueError, match="teacher_classes"):
        JobConfig(kind="train", student=dict(arch="retinanet", num_classes=3), data=data, teacher_classes={})
