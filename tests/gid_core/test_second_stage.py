"""Faster R-CNN's second stage in GID (issue #9, 6f): GI boxes as shared proposals through both box
heads, the class-wise discrepancy in the GI score, and the second-stage response loss.

Expectations come from independent element-by-element computations (``math``, Python loops) on
hand-built inputs, never from the code under test."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from gid_core.config import DistillConfig
from gid_core.distill import GIDDistiller
from gid_core.losses import rcnn_response_loss
from gid_core.second_stage import box_head_outputs, class_discrepancy, top_k_per_image
from tests.gid_core.test_distill import _batch, _model


def softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def smooth_l1(d: float, beta: float) -> float:
    return 0.5 * d * d / beta if abs(d) < beta else abs(d) - 0.5 * beta


# ----------------------------------------------------------------------------- pure functions
def test_class_discrepancy_is_the_largest_foreground_softmax_gap() -> None:
    t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    s = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    expected = []
    for tr, sr in zip(t.tolist(), s.tolist()):
        pt, ps = softmax(tr), softmax(sr)
        expected.append(max(abs(pt[c] - ps[c]) for c in (1, 2)))  # background (column 0) left out
    torch.testing.assert_close(class_discrepancy(t, s), torch.tensor(expected))
    assert class_discrepancy(torch.zeros(0, 3), torch.zeros(0, 3)).shape == (0,)


def test_top_k_per_image_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    image_index = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    scores = torch.rand(image_index.numel(), generator=gen)
    expected = []
    for image in range(4):  # image 3 has no candidate
        rows = [i for i in range(len(scores)) if image_index[i] == image]
        expected += sorted(rows, key=lambda i: -scores[i].item())[:3]
    assert top_k_per_image(scores, image_index, 3).tolist() == expected
    assert top_k_per_image(scores[:0], image_index[:0], 3).tolist() == []


def rcnn_by_hand(t_logits, s_logits, t_deltas, s_deltas, temperature, count):
    cls = reg = 0.0
    for k in range(len(t_logits)):
        pt, ps = softmax(t_logits[k], temperature), softmax(s_logits[k], temperature)
        cls += temperature**2 * sum(a * (math.log(a) - math.log(b)) for a, b in zip(pt, ps))
        p1 = softmax(t_logits[k])
        best = max(range(1, len(p1)), key=lambda c: p1[c])  # teacher's most likely foreground class
        box = sum(smooth_l1(s_deltas[k][best][i] - t_deltas[k][best][i], 1 / 9) for i in range(4))
        reg += (1.0 - p1[0]) * box
    return cls / max(1, count), reg / max(1, count)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_rcnn_response_loss_matches_hand_computation(temperature: float) -> None:
    t_logits = torch.tensor([[0.5, 2.0, -1.0], [3.0, 0.1, 0.4], [-1.0, 0.0, 1.5]], dtype=torch.float64)
    s_logits = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, -2.0], [0.3, 0.2, 0.1]], dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    t_deltas = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64)
    s_deltas = t_deltas + torch.tensor([0.05, -0.3, 1.0, 0.0], dtype=torch.float64)  # both smooth-L1 branches
    args = (t_logits.tolist(), s_logits.tolist(), t_deltas.tolist(), s_deltas.tolist(), temperature)
    cls, reg = rcnn_response_loss(t_logits, s_logits, t_deltas, s_deltas, temperature=temperature)
    cls_hand, reg_hand = rcnn_by_hand(*args, count=3)
    assert cls.item() == pytest.approx(cls_hand, rel=1e-10)
    assert reg.item() == pytest.approx(reg_hand, rel=1e-10)
    cls5, reg5 = rcnn_response_loss(t_logits, s_logits, t_deltas, s_deltas, temperature=temperature, normalizer=5)
    assert (cls5.item(), reg5.item()) == pytest.approx(rcnn_by_hand(*args, count=5), rel=1e-10)


def test_rcnn_response_loss_gradients_and_edges() -> None:
    gen = torch.Generator().manual_seed(4)
    t_logits, t_deltas = torch.randn(4, 5, generator=gen), torch.randn(4, 5, 4, generator=gen)
    s_logits = torch.randn(4, 5, generator=gen, requires_grad=True)
    s_deltas = torch.randn(4, 5, 4, generator=gen, requires_grad=True)
    t_logits.requires_grad_(True)
    cls, reg = rcnn_response_loss(t_logits, s_logits, t_deltas, s_deltas)
    (cls + reg).backward()
    assert t_logits.grad is None  # the teacher is a target
    # d KL / d s = softmax(s) - softmax(t), over the 4 rows
    torch.testing.assert_close(s_logits.grad, (s_logits.softmax(-1) - t_logits.softmax(-1)).detach() / 4)
    best = 1 + t_logits[:, 1:].argmax(dim=1)
    for k in range(4):  # only the teacher's class gets a box gradient
        others = [c for c in range(5) if c != best[k]]
        assert s_deltas.grad[k, others].abs().sum() == 0 and s_deltas.grad[k, best[k]].abs().sum() > 0
    # agreement costs nothing; no GI is a connected zero
    same = rcnn_response_loss(t_logits.detach(), t_logits.detach().clone(), t_deltas, t_deltas.clone())
    assert same[0].item() == pytest.approx(0.0, abs=1e-6) and same[1].item() == 0.0
    empty = torch.zeros(0, 5, requires_grad=True)
    cls, reg = rcnn_response_loss(torch.zeros(0, 5), empty, torch.zeros(0, 5, 4), torch.zeros(0, 5, 4))
    assert cls.item() == 0.0 and reg.item() == 0.0 and cls.requires_grad
    with pytest.raises(ValueError, match="t_deltas and s_deltas"):
        rcnn_response_loss(t_logits, s_logits, t_deltas[:, :3], s_deltas[:, :3])


# ----------------------------------------------------------------------------- in the distiller
def _distiller(**cfg) -> GIDDistiller:
    torch.manual_seed(0)
    return GIDDistiller(_model("fasterrcnn", fpn=64), _model("fasterrcnn", fpn=32), DistillConfig(**cfg)).train()


def _dense(d: GIDDistiller):
    images, targets = _batch()
    image_list, targets = d.student.transform(images, targets)
    with torch.no_grad():
        t_out = d.view(d.teacher, image_list, d._anchors)
        s_out = d.view(d.student, image_list, d._anchors)
    return image_list, t_out, s_out


def test_box_heads_see_the_gi_boxes_one_to_one() -> None:
    """Row k of the box head's output depends on proposal k alone: the same whether pooled with the
    rest of the batch or on its own."""
    d = _distiller()
    image_list, t_out, _ = _dense(d)
    boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0], [10.0, 20.0, 90.0, 70.0], [0.0, 0.0, 95.0, 95.0]])
    with torch.no_grad():
        logits, deltas = box_head_outputs(d.teacher, t_out.features, t_out.feature_names, boxes, [2, 1],
                                          image_list.image_sizes)
        alone = box_head_outputs(d.teacher, t_out.features, t_out.feature_names, boxes[2:], [0, 1],
                                 image_list.image_sizes)
    assert logits.shape == (3, 4) and deltas.shape == (3, 4, 4)  # 3 classes + background
    torch.testing.assert_close(logits[2:], alone[0])
    torch.testing.assert_close(deltas[2:], alone[1])


def test_second_stage_rescores_the_gism_pool() -> None:
    """The GIs are the top_k per image of max(RPN score, box-head class discrepancy) over GISM's
    pool of 2 * top_k candidates, recomputed here with Python loops."""
    d = _distiller(top_k=3, second_stage_pool=2)
    image_list, t_out, s_out = _dense(d)
    pool = d.select_instances(t_out, s_out)
    assert pool.counts.tolist() == [6, 6]  # GISM kept the pool
    gi, (t_logits, s_logits, t_deltas, s_deltas) = d.second_stage(pool, t_out, s_out, image_list, grad=False)
    with torch.no_grad():
        args = (pool.boxes, pool.counts.tolist(), image_list.image_sizes)
        tl, td = box_head_outputs(d.teacher, t_out.features, t_out.feature_names, *args)
        sl, sd = box_head_outputs(d.student, s_out.features, s_out.feature_names, *args)
    expected, score = [], {}
    for image in range(2):
        rows = [k for k in range(len(pool.boxes)) if pool.image_index[k] == image]
        for k in rows:
            pt, ps = softmax(tl[k].tolist()), softmax(sl[k].tolist())
            score[k] = max(pool.scores[k].item(), *(abs(a - b) for a, b in zip(pt[1:], ps[1:])))
        expected += sorted(rows, key=lambda k: -score[k])[:3]
    assert gi.counts.tolist() == [3, 3]
    torch.testing.assert_close(gi.boxes, pool.boxes[expected])
    torch.testing.assert_close(gi.scores, torch.tensor([score[k] for k in expected]))
    torch.testing.assert_close(t_logits, tl[expected])
    torch.testing.assert_close(s_deltas, sd[expected])


def test_one_step_with_the_second_stage_trains_the_students_box_head() -> None:
    d = _distiller()
    images, targets = _batch()
    losses = d(images, targets)
    assert {"loss_response_rcnn_cls", "loss_response_rcnn_reg"} <= losses.keys()
    assert all(torch.isfinite(v) for v in losses.values())
    assert d.last_stats["gi_per_image"].item() == 10.0  # top_k, out of a pool of 20
    (losses["loss_response_rcnn_cls"] + losses["loss_response_rcnn_reg"]).backward()
    heads = d.student.roi_heads
    for module in (heads.box_head, heads.box_predictor):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    assert all(p.grad is None for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.student.rpn.parameters())  # the RPN is not in these terms


def test_second_stage_off_adds_nothing() -> None:
    images, targets = _batch()
    off = _distiller(second_stage=False)
    losses = off(images, targets)
    assert not any("rcnn" in name for name in losses)
    assert off.gism_top_k == off.config.top_k
    # on, without the response loss: rescoring only
    no_response = _distiller(use_response=False)
    assert not any("response" in name for name in no_response(images, targets))
    # one-stage detectors have no second stage
    torch.manual_seed(0)
    retina = GIDDistiller(_model("retinanet", fpn=64), _model("retinanet"), DistillConfig()).train()
    assert not retina.use_second_stage and retina.gism_top_k == 10
    assert not any("rcnn" in name for name in retina(images, targets))


def test_identical_student_has_nothing_to_distil_in_the_second_stage() -> None:
    torch.manual_seed(0)
    teacher = _model("fasterrcnn", fpn=32)
    d = GIDDistiller(teacher, copy.deepcopy(teacher), DistillConfig()).train()
    d.student.eval()  # same normalisation statistics as the teacher
    losses = d(*_batch())
    assert losses["loss_response_rcnn_cls"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_response_rcnn_reg"].item() == pytest.approx(0.0, abs=1e-6)


def test_second_stage_settings_reach_the_api_body() -> None:
    from service.schemas import JobCreate

    props = JobCreate.model_json_schema()["$defs"]["DistillConfig"]["properties"]
    assert {"second_stage", "second_stage_pool", "rcnn_temperature", "normalize_losses"} <= props.keys()
    assert props["second_stage"]["default"] is True


def test_second_stage_with_a_teacher_of_other_classes() -> None:
    """Teacher of 5 classes, student of 3 (teacher labels 4, 3, 2): the box heads' outputs are read
    at the teacher's columns of the matched classes; background takes the unmatched ones."""
    from gid_core.classmap import ClassMatch
    from gid_core.config import ModelConfig
    from gid_core.models import build_detector
    from tests.gid_core.test_distill import SIZE

    torch.manual_seed(0)
    teacher = build_detector(ModelConfig(arch="fasterrcnn", backbone="resnet18", num_classes=5, fpn_channels=64,
                                         min_size=SIZE, max_size=SIZE))
    match = ClassMatch((1, 2, 3), (4, 3, 2), 3, 5)
    d = GIDDistiller(teacher, _model("fasterrcnn", fpn=32), DistillConfig(top_k=4), classes=match).train()
    image_list, t_out, s_out = _dense(d)
    pool = d.select_instances(t_out, s_out)
    gi, (t_logits, _, t_deltas, s_deltas) = d.second_stage(pool, t_out, s_out, image_list, grad=False)
    with torch.no_grad():
        tl, td = box_head_outputs(d.teacher, t_out.features, t_out.feature_names, gi.boxes, gi.counts.tolist(),
                                  image_list.image_sizes)
    assert t_logits.shape == (len(gi.boxes), 4) and t_deltas.shape == s_deltas.shape == (len(gi.boxes), 4, 4)
    for k in range(len(gi.boxes)):
        full = softmax(tl[k].tolist())  # background 0, classes 1..5; unmatched: 1 and 5
        mine = softmax(t_logits[k].tolist())
        expected = [full[0] + full[1] + full[5], full[4], full[3], full[2]]
        assert mine == pytest.approx(expected, rel=1e-4, abs=1e-6)
        for j, c in enumerate((4, 3, 2)):
            torch.testing.assert_close(t_deltas[k, 1 + j], td[k, c])
    losses = d(*_batch())
    assert torch.isfinite(losses["loss_response_rcnn_cls"]) and torch.isfinite(losses["loss_response_rcnn_reg"])
