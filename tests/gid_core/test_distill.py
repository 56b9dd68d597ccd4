"""GIDDistiller: frozen teacher, trained adapter, loss switches, and the matchers against torchvision's own."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.ops import boxes as box_ops

from gid_core.config import DistillConfig, ModelConfig
from gid_core.dense import FCOSView, RetinaNetView, iou_matcher_positive
from gid_core.distill import GIDDistiller
from gid_core.models import build_detector
from gid_core.roi import assign_levels

SIZE = 96


def _model(arch: str, backbone: str = "resnet18", fpn: int = 32, **kw) -> nn.Module:
    if arch == "fcos":
        fpn = max(fpn, 64)
    cfg = ModelConfig(arch=arch, backbone=backbone, num_classes=3, fpn_channels=fpn, min_size=SIZE, max_size=SIZE, **kw)
    return build_detector(cfg)


def _batch(n: int = 2):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(n)]
    targets = [
        {"boxes": torch.tensor([[5.0, 6.0, 40.0, 44.0], [50.0, 48.0, 90.0, 80.0]]), "labels": torch.tensor([1, 3])}
        for _ in range(n)
    ]
    return images, targets


def _distiller(arch: str = "retinanet", **cfg) -> GIDDistiller:
    torch.manual_seed(0)
    teacher = _model(arch, "resnet34", fpn=64)
    student = _model(arch, "resnet18", fpn=32)
    return GIDDistiller(teacher, student, DistillConfig(**cfg)).train()


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_teacher_frozen_student_and_adapter_learn(arch):
    d = _distiller(arch)
    teacher_before = copy.deepcopy(d.teacher.state_dict())
    adapter_before = d.adapter.weight.detach().clone()
    opt = torch.optim.SGD([p for p in d.parameters() if p.requires_grad], lr=0.01)
    images, targets = _batch()
    losses = d(images, targets)
    assert {"loss_feature", "loss_relation", "loss_response_cls", "loss_response_reg"} <= losses.keys()
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in d.teacher.parameters())
    assert not d.teacher.training and d.student.training
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.backbone.parameters())
    opt.step()
    assert not torch.equal(d.adapter.weight, adapter_before), "the adapter must be trained"
    for k, v in d.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), f"teacher changed: {k}"
    assert d.last_stats["gi_per_image"].item() == 10.0


def test_state_dict_has_student_and_adapter_but_no_teacher():
    d = _distiller()
    state = d.state_dict()
    assert any(k.startswith("adapter.") for k in state) and any(k.startswith("student.") for k in state)
    assert not any(k.startswith("teacher.") for k in state)
    other = _distiller()
    with torch.no_grad():
        for p in other.student.parameters():
            p.add_(1.0)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.student.state_dict().values(), d.student.state_dict().values()))


def test_train_mode_keeps_teacher_in_eval():
    d = _distiller()
    d.train()
    assert not d.teacher.training
    d.eval()
    with pytest.raises(RuntimeError, match="training losses"):
        d(*_batch())


def test_loss_switches_and_weights():
    images, targets = _batch()
    base = _distiller()
    losses = {k: v.detach() for k, v in base(images, targets).items()}
    doubled = _distiller(weight_relation=80.0, weight_response_reg=2.0)
    losses2 = {k: v.detach() for k, v in doubled(images, targets).items()}
    torch.testing.assert_close(losses2["loss_relation"], 2 * losses["loss_relation"])
    torch.testing.assert_close(losses2["loss_response_reg"], 2 * losses["loss_response_reg"])
    torch.testing.assert_close(losses2["classification"], losses["classification"])

    off = _distiller(use_relation=False, use_response=False)
    losses3 = off(images, targets)
    assert "loss_relation" not in losses3 and "loss_response_cls" not in losses3
    torch.testing.assert_close(losses3["loss_feature"].detach(), losses["loss_feature"])

    no_feature = _distiller(use_feature=False)
    out = no_feature(images, targets)
    assert out["loss_feature"].item() == 0.0
    out["loss_feature"].backward()  # the adapter stays in the graph (DDP needs it) with zero grad
    assert no_feature.adapter.weight.grad is not None and no_feature.adapter.weight.grad.abs().sum() == 0


def test_identical_student_gives_zero_distillation_losses():
    """Teacher == student and an identity adapter: nothing to distil except the BCE's entropy floor."""
    torch.manual_seed(0)
    teacher = _model("retinanet", fpn=32)
    student = copy.deepcopy(teacher)
    d = GIDDistiller(teacher, student, DistillConfig())
    with torch.no_grad():
        d.adapter.weight.zero_()
        d.adapter.bias.zero_()
        for c in range(32):
            d.adapter.weight[c, c, 1, 1] = 1.0  # identity 3x3 conv
    d.train()
    d.student.eval()  # same normalisation statistics as the teacher
    losses = d(*_batch())
    assert losses["loss_feature"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_relation"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_response_reg"].item() == pytest.approx(0.0, abs=1e-6)
    assert d.last_stats["gi_score_mean"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_response_cls"].item() > 0  # BCE(p, p) is p's entropy, not 0


def test_incompatible_teacher_rejected():
    teacher = _model("retinanet", anchor_sizes=[16, 32, 64, 128, 256])
    student = _model("retinanet")
    with pytest.raises(ValueError, match="anchors differ"):
        GIDDistiller(teacher, student)
    with pytest.raises(ValueError, match="same detector family"):
        GIDDistiller(_model("fcos"), _model("retinanet"))


def _random_boxes(g, n, size=SIZE):
    xy = torch.rand(n, 2, generator=g) * size * 0.7
    wh = 4 + torch.rand(n, 2, generator=g) * size * 0.5
    return torch.cat([xy, (xy + wh).clamp(max=size)], dim=1)


def test_iou_matcher_matches_torchvision_matcher():
    g = torch.Generator().manual_seed(1)
    anchors = _random_boxes(g, 300)
    matcher = det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    gi = [_random_boxes(g, 7), _random_boxes(g, 3)]
    padded = torch.zeros(2, 10, 4)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    for i, b in enumerate(gi):
        padded[i, : len(b)] = b
        valid[i, : len(b)] = True
    ours = iou_matcher_positive(padded, valid, anchors.expand(2, -1, -1), high=0.5, allow_low_quality=True)
    for i, b in enumerate(gi):
        expected = matcher(box_ops.box_iou(b, anchors)) >= 0
        assert torch.equal(ours[i], expected)


def _capture_matched_idxs(model, call):
    """Run torchvision's own compute_loss and record the matched_idxs it hands to its head."""
    captured = {}

    def capture(targets, head_outputs, anchors, matched_idxs):
        captured["matched"] = matched_idxs
        return {}

    model.head.compute_loss = capture
    call()
    return captured["matched"]


@pytest.mark.parametrize("arch,view", [("retinanet", RetinaNetView()), ("fcos", FCOSView())])
def test_response_mask_is_the_students_own_assignment(arch, view):
    student = _model(arch)
    images = student.transform([torch.rand(3, SIZE, SIZE)] * 2)[0]
    features = list(student.backbone(images.tensors).values())
    anchors = student.anchor_generator(images, features)
    num_per_level = [f.shape[-2] * f.shape[-1] * (9 if arch == "retinanet" else 1) for f in features]
    g = torch.Generator().manual_seed(2)
    gi = [_random_boxes(g, 6), _random_boxes(g, 4)]
    targets = [{"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)} for b in gi]
    head = student.head(features)
    if arch == "retinanet":
        matched = _capture_matched_idxs(student, lambda: student.compute_loss(targets, head, anchors))
    else:
        matched = _capture_matched_idxs(student, lambda: student.compute_loss(targets, head, anchors, num_per_level))
    padded = torch.zeros(2, 10, 4)
    valid = torch.zeros(2, 10, dtype=torch.bool)
    for i, b in enumerate(gi):
        padded[i, : len(b)] = b
        valid[i, : len(b)] = True
    mask = view.positive_mask(student, padded, valid, torch.stack(anchors), num_per_level)
    expected = torch.stack([m >= 0 for m in matched])
    assert expected.any()
    assert torch.equal(mask, expected)


def test_faster_rcnn_response_mask_is_the_rpn_assignment():
    d = _distiller("fasterrcnn")
    student = d.student
    images = student.transform([torch.rand(3, SIZE, SIZE)])[0]
    features = list(student.backbone(images.tensors).values())
    anchors = student.rpn.anchor_generator(images, features)
    g = torch.Generator().manual_seed(3)
    gi = _random_boxes(g, 5)
    labels, _ = student.rpn.assign_targets_to_anchors(anchors, [{"boxes": gi}])
    padded = torch.zeros(1, 10, 4)
    padded[0, :5] = gi
    valid = torch.zeros(1, 10, dtype=torch.bool)
    valid[0, :5] = True
    mask = d.view.positive_mask(student, padded, valid, torch.stack(anchors), [])
    assert torch.equal(mask[0], labels[0] == 1)


# --------------------------------------------------------------------------- mixed precision, input scale


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_boxes_are_decoded_and_selected_in_float32_under_autocast(arch):
    """Under autocast the heads return half precision; torchvision's box coders decode in the
    deltas' dtype (anchors cast down too). Every view must decode, score and select in float32."""
    d = _distiller(arch)
    images, targets = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_list, scaled = d.student.transform(images, [dict(t) for t in targets])
        t_out = d.view(d.teacher, image_list, d._anchors)
        s_out = d.view(d.student, image_list, d._anchors, scaled)
        assert t_out.logits.dtype == torch.bfloat16  # autocast is on: the heads ran in bfloat16
        for out in (t_out, s_out):
            assert out.boxes.dtype == torch.float32 and out.probs.dtype == torch.float32
        assert all(a.dtype == torch.float32 for a in d._anchors(image_list, s_out.features))
        gi = d.select_instances(t_out, s_out)
        assert gi.boxes.dtype == torch.float32 and gi.scores.dtype == torch.float32
        losses = d(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_large_boxes_go_to_their_level_whatever_the_dtype(dtype):
    """sqrt(w * h) in float16 overflows above 256 px: 300 and 448 px boxes went to P7."""
    sides = [112.0, 224.0, 300.0, 448.0]
    boxes = torch.tensor([[10.0, 10.0, 10.0 + s, 10.0 + s] for s in sides], dtype=dtype)
    index = assign_levels(boxes, [3, 4, 5, 6, 7], canonical_scale=224.0, canonical_level=4)
    assert [3 + int(i) for i in index] == [3, 4, 4, 5]


def test_pixel_settings_scale_with_the_students_input_size():
    d = _distiller()  # student min_size 96
    assert d.gi_min_box_size == pytest.approx(10.0 * SIZE / 800)
    assert d.roi_canonical_scale == pytest.approx(224.0 * SIZE / 800)
    set_explicitly = _distiller(min_box_size=0.0, roi_canonical_scale=224.0)
    assert set_explicitly.gi_min_box_size == 0.0 and set_explicitly.roi_canonical_scale == 224.0
    assert DistillConfig().min_box_size is None and DistillConfig().roi_canonical_scale is None
    assert DistillConfig().gi_min_box_size(800) == 10.0 and DistillConfig().roi_scale(800) == 224.0


def test_degenerate_predictions_never_become_general_instances():
    """Predictions clipped to zero area outside the image must not fill the K slots."""
    d = _distiller(min_box_size=0.0)
    images, targets = _batch()
    image_list, _ = d.student.transform(images, targets)
    with torch.no_grad():
        t_out = d.view(d.teacher, image_list, d._anchors)
        s_out = d.view(d.student, image_list, d._anchors)
    # the teacher is sure of (and the student blind to) half the predictions, all squashed to a line
    half = t_out.probs.shape[1] // 2
    t_out.probs[:, :half] = 1.0
    s_out.probs[:, :half] = 0.0
    t_out.boxes[:, :half, 2] = t_out.boxes[:, :half, 0]
    gi = d.select_instances(t_out, s_out)
    assert gi.counts.tolist() == [10, 10]
    widths, heights = gi.boxes[:, 2] - gi.boxes[:, 0], gi.boxes[:, 3] - gi.boxes[:, 1]
    assert bool(((widths > 0) & (heights > 0)).all())
