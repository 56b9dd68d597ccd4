"""GISM: GI scores, GI boxes, min-size filter, pre-NMS cut, NMS, top-k; batched == per image."""

from __future__ import annotations

import pytest
import torch

from gid_core import gism
from gid_core.gism import select_general_instances, select_general_instances_batched

# Hand-built image, R = 6 predictions, C = 2 classes.
# row  t_prob      s_prob      GI score  teacher max > student max?  GI box
#  0   .9 .1       .2 .1       .7        .9 > .2  yes  -> teacher [0,0,10,10]
#  1   .1 .3       .1 .8       .5        .3 > .8  no   -> student [1,0,11,10]   (IoU .818 with row 0)
#  2   .6 .0       .0 .0       .6        yes           -> teacher [20,20,21,40] (1 px wide)
#  3   .5 .5       .2 .5       .3        .5 > .5  no (tie goes to student) -> [40,40,50,50]
#  4   .3 .2       .1 .2       .2        yes           -> teacher [60,0,70,10]
#  5   .1 .1       .2 .1       .1        no            -> student [80,80,92,95]
# Score order: 0 (.7), 2 (.6), 1 (.5), 3 (.3), 4 (.2), 5 (.1).
T_PROB = [[0.9, 0.1], [0.1, 0.3], [0.6, 0.0], [0.5, 0.5], [0.3, 0.2], [0.1, 0.1]]
S_PROB = [[0.2, 0.1], [0.1, 0.8], [0.0, 0.0], [0.2, 0.5], [0.1, 0.2], [0.2, 0.1]]
T_BOX = [[0, 0, 10, 10], [100, 100, 110, 110], [20, 20, 21, 40], [0, 0, 10, 10], [60, 0, 70, 10], [0, 0, 10, 10]]
S_BOX = [[50, 50, 60, 60], [1, 0, 11, 10], [120, 0, 130, 10], [40, 40, 50, 50], [0, 0, 10, 10], [80, 80, 92, 95]]
GI_BOX = [T_BOX[0], S_BOX[1], T_BOX[2], S_BOX[3], T_BOX[4], S_BOX[5]]
GI_SCORE = [0.7, 0.5, 0.6, 0.3, 0.2, 0.1]


def hand_case() -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(x, dtype=torch.float32) for x in (T_PROB, T_BOX, S_PROB, S_BOX))


def expect(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([GI_BOX[r] for r in rows], dtype=torch.float32).reshape(-1, 4), torch.tensor(
        [GI_SCORE[r] for r in rows], dtype=torch.float32
    )


@pytest.mark.parametrize(
    "kwargs, rows",
    [
        ({}, [0, 2, 3, 4, 5]),  # row 1 overlaps row 0 (IoU .818 > .3) and scores lower
        ({"nms_iou": 0.9}, [0, 2, 1, 3, 4, 5]),  # .818 < .9: row 1 survives
        ({"min_size": 2.0}, [0, 3, 4, 5]),  # row 2 is 1 px wide
        ({"min_size": 1.0}, [0, 2, 3, 4, 5]),  # a side equal to min_size is kept
        ({"min_size": 10.5}, [5]),  # only the 12x15 box has both sides >= 10.5
        ({"pre_nms_top_n": 2}, [0, 2]),
        ({"pre_nms_top_n": 3}, [0, 2]),  # the cut is before NMS: rows 0, 2, 1 -> 1 suppressed
        ({"pre_nms_top_n": 2, "min_size": 2.0}, [0]),  # the size filter is before the cut: 0, 1
        ({"top_k": 2}, [0, 2]),
        ({"top_k": 3}, [0, 2, 3]),  # top_k is after NMS
        ({"top_k": 1, "nms_iou": 0.9}, [0]),
    ],
)
def test_hand_built_selection(kwargs: dict, rows: list[int]) -> None:
    boxes, scores = select_general_instances(*hand_case(), **kwargs)
    exp_boxes, exp_scores = expect(rows)
    assert torch.equal(boxes, exp_boxes)
    torch.testing.assert_close(scores, exp_scores)


def test_teacher_box_only_where_teacher_is_more_confident() -> None:
    boxes, _ = select_general_instances(*hand_case(), nms_iou=1.0)
    t_prob, t_box, s_prob, s_box = hand_case()
    assert torch.equal(boxes[0], t_box[0]) and not torch.equal(boxes[0], s_box[0])  # .9 > .2
    assert torch.equal(boxes[2], s_box[1])  # row 1: student .8 > teacher .3
    assert torch.equal(boxes[3], s_box[3])  # row 3: equal maxima (.5) -> student box


def test_empty_input() -> None:
    boxes, scores = select_general_instances(
        torch.zeros(0, 3), torch.zeros(0, 4), torch.zeros(0, 3), torch.zeros(0, 4)
    )
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_all_filtered_by_min_size_gives_empty() -> None:
    boxes, scores = select_general_instances(*hand_case(), min_size=100.0)
    assert boxes.shape == (0, 4) and scores.shape == (0,)


def test_zero_scores_are_still_candidates() -> None:
    # Teacher == student everywhere: every GI score is 0, the boxes are still selected.
    prob = torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.9, 0.1]])
    box = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0], [40.0, 0.0, 50.0, 10.0]])
    boxes, scores = select_general_instances(prob, box, prob.clone(), box.clone(), top_k=10)
    assert torch.equal(scores, torch.zeros(3))
    assert sorted(map(tuple, boxes.tolist())) == sorted(map(tuple, box.tolist()))
    boxes, scores = select_general_instances(prob, box, prob.clone(), box.clone(), top_k=2)
    assert boxes.shape == (2, 4) and scores.shape == (2,)


def test_output_carries_no_gradient() -> None:
    t_prob, t_box, s_prob, s_box = (x.clone().requires_grad_(True) for x in hand_case())
    boxes, scores = select_general_instances(t_prob, t_box, s_prob, s_box)
    assert not boxes.requires_grad and not scores.requires_grad
    for b, s in select_general_instances_batched(t_prob[None], t_box[None], s_prob[None], s_box[None]):
        assert not b.requires_grad and not s.requires_grad


def test_bad_shapes_and_parameters_are_rejected() -> None:
    t_prob, t_box, s_prob, s_box = hand_case()
    with pytest.raises(ValueError, match="t_prob and s_prob"):
        select_general_instances(t_prob, t_box, s_prob[:, :1], s_box)
    with pytest.raises(ValueError, match="t_box and s_box"):
        select_general_instances(t_prob, t_box[:5], s_prob, s_box)
    with pytest.raises(ValueError, match=r"\(N, R, C\)"):
        select_general_instances_batched(t_prob, t_box, s_prob, s_box)
    with pytest.raises(ValueError, match="top_k"):
        select_general_instances(t_prob, t_box, s_prob, s_box, top_k=0)
    with pytest.raises(ValueError, match="nms_iou"):
        select_general_instances(t_prob, t_box, s_prob, s_box, nms_iou=0.0)


def random_batch(gen: torch.Generator, n: int, r: int, c: int, offset: float = 0.0) -> tuple[torch.Tensor, ...]:
    def boxes() -> torch.Tensor:
        xy = torch.rand(n, r, 2, generator=gen) * 100 + offset
        wh = torch.rand(n, r, 2, generator=gen) * 30 + 0.5
        return torch.cat([xy, xy + wh], dim=-1)

    t_prob = torch.rand(n, r, c, generator=gen)
    s_prob = torch.rand(n, r, c, generator=gen)
    return t_prob, boxes(), s_prob, boxes()


def assert_batched_matches_single(inputs: tuple[torch.Tensor, ...], first_prefix: int | None = None,
                                  **kwargs) -> list[int]:
    batched = select_general_instances_batched(*inputs, first_prefix=first_prefix, **kwargs)
    assert len(batched) == inputs[0].shape[0]
    sizes = []
    for i, (boxes, scores) in enumerate(batched):
        exp_boxes, exp_scores = select_general_instances(*(x[i] for x in inputs), **kwargs)
        assert torch.equal(boxes, exp_boxes), f"image {i}"
        assert torch.equal(scores, exp_scores), f"image {i}"
        sizes.append(len(scores))
    return sizes


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # 3 x 500 x 4 coordinates: batched_nms' per-group loop on CPU
        {"pre_nms_top_n": 100, "top_k": 50},  # 1200 coordinates: its coordinate-offset trick
        {"min_size": 12.0, "nms_iou": 0.5, "top_k": 30},
        {"min_size": 25.0, "pre_nms_top_n": 50},  # few valid boxes: fewer than pre_nms_top_n
    ],
)
@pytest.mark.parametrize("offset", [0.0, -200.0])  # negative coordinates must not mix images
def test_batched_equals_single_random(kwargs: dict, offset: float) -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = assert_batched_matches_single(random_batch(gen, 3, 500, 5, offset), **kwargs)
    assert all(s > 0 for s in sizes)


def test_batched_equals_single_hand_built() -> None:
    t_prob, t_box, s_prob, s_box = hand_case()
    perm = torch.tensor([3, 5, 0, 1, 4, 2])
    identical = (t_prob, t_box, t_prob.clone(), t_box + torch.arange(6.0)[:, None] * 15)
    inputs = (
        torch.stack([t_prob, t_prob[perm], s_prob.flip(0)]),
        torch.stack([t_box, t_box[perm], s_box.flip(0)]),
        torch.stack([s_prob, s_prob[perm], s_prob.flip(0)]),  # image 2: all GI scores 0
        torch.stack([s_box, s_box[perm], identical[3]]),
    )
    for kwargs in ({}, {"nms_iou": 0.9}, {"min_size": 2.0, "pre_nms_top_n": 2}, {"top_k": 3}):
        # Image 2 has only tied (zero) scores: which ties survive a cut is implementation-defined.
        batched = select_general_instances_batched(*inputs, **kwargs)
        for i in range(2):
            exp = select_general_instances(*(x[i] for x in inputs), **kwargs)
            assert torch.equal(batched[i][0], exp[0]) and torch.equal(batched[i][1], exp[1])
        exp = select_general_instances(*(x[2] for x in inputs), **kwargs)
        assert batched[2][0].shape == exp[0].shape and not batched[2][1].any()
        if "top_k" not in kwargs and "pre_nms_top_n" not in kwargs:  # no cut among the ties
            assert sorted(map(tuple, batched[2][0].tolist())) == sorted(map(tuple, exp[0].tolist()))
    # Same selection as the hand-derived expectation, wherever the image sits in the batch.
    boxes, scores = select_general_instances_batched(*inputs)[1]
    exp_boxes, exp_scores = expect([0, 2, 3, 4, 5])
    assert torch.equal(boxes, exp_boxes)
    torch.testing.assert_close(scores, exp_scores)


def test_batched_empty() -> None:
    out = select_general_instances_batched(
        torch.zeros(2, 0, 3), torch.zeros(2, 0, 4), torch.zeros(2, 0, 3), torch.zeros(2, 0, 4)
    )
    assert len(out) == 2 and all(b.shape == (0, 4) and s.shape == (0,) for b, s in out)
    assert select_general_instances_batched(
        torch.zeros(0, 5, 3), torch.zeros(0, 5, 4), torch.zeros(0, 5, 3), torch.zeros(0, 5, 4)
    ) == []


@pytest.mark.parametrize("first_prefix", [1, 7, 64, 5000])
@pytest.mark.parametrize("kwargs", [{}, {"top_k": 40, "nms_iou": 0.5}, {"min_size": 20.0, "pre_nms_top_n": 300}])
def test_batched_prefix_rounds_equal_single(first_prefix: int, kwargs: dict) -> None:
    # Any first prefix gives the full result: it grows until every image has top_k survivors or
    # has run out of valid candidates.
    gen = torch.Generator().manual_seed(1)
    assert_batched_matches_single(random_batch(gen, 3, 500, 5), first_prefix=first_prefix, **kwargs)


def test_batched_prefix_grows_past_a_crowded_top(monkeypatch: pytest.MonkeyPatch) -> None:
    # Image 0: its 300 best candidates are jittered copies of one box (NMS keeps one of them), so
    # the top_k GIs lie far beyond a 128-candidate prefix. Image 1 is spread out and is done in
    # the first round; both must still match the single-image path.
    gen = torch.Generator().manual_seed(2)
    t_prob, t_box, s_prob, s_box = random_batch(gen, 2, 1000, 3)
    t_prob[0, :300], s_prob[0, :300] = 1.0, 0.0  # GI score 1: the top of image 0
    crowd = torch.tensor([10.0, 10.0, 40.0, 40.0]) + torch.rand(300, 4, generator=gen) * 0.5
    t_box[0, :300] = crowd  # the teacher is the more confident one there, so its box is the GI box
    prefixes: list[int] = []
    one_round = gism._nms_on_prefix
    monkeypatch.setattr(gism, "_nms_on_prefix", lambda *a, **kw: prefixes.append(a[5]) or one_round(*a, **kw))
    sizes = assert_batched_matches_single((t_prob, t_box, s_prob, s_box), first_prefix=128)
    assert sizes == [10, 10]
    assert prefixes == [128, 256, 512]  # the crowd fills 300 places; 9 more GIs need the third round
    boxes, _ = select_general_instances_batched(t_prob, t_box, s_prob, s_box)[0]
    assert (boxes[1:] - crowd[0]).abs().amax(dim=1).gt(1.0).all()  # 9 GIs from beyond the crowd


def test_batched_rejects_bad_first_prefix() -> None:
    with pytest.raises(ValueError, match="first_prefix"):
        select_general_instances_batched(*random_batch(torch.Generator().manual_seed(0), 1, 5, 2), first_prefix=0)


@pytest.mark.parametrize("min_size", [0.0, 1.0])
def test_degenerate_boxes_are_never_selected(min_size) -> None:
    """Boxes clipped away outside the image have zero area; NMS cannot suppress them, so with the
    highest GI scores they would fill every slot."""
    n = 40
    t_prob = torch.linspace(0.9, 0.5, n)[:, None]
    s_prob = torch.zeros(n, 1)
    boxes = torch.tensor([[100.0, 10.0, 100.0, 30.0]] * 20 + [[0.0, 50.0, 30.0, 50.0]] * 10  # zero width / height
                         + [[10.0 * i, 0.0, 10.0 * i + 8, 8.0] for i in range(10)])  # 10 real, disjoint
    for select in (select_general_instances, lambda *a, **k: select_general_instances_batched(
            *(x[None] for x in a), **k)[0]):
        out, _ = select(t_prob, boxes, s_prob, boxes, top_k=10, min_size=min_size)
        assert out.shape == (10, 4)
        assert bool(((out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])).all())


def test_half_precision_inputs_are_selected_in_float32() -> None:
    t_prob, t_box, s_prob, s_box = hand_case()
    far = [x.half() for x in (t_prob, t_box + 3000.5, s_prob, s_box + 3000.5)]
    boxes, scores = select_general_instances(*far)
    assert boxes.dtype == torch.float32 and scores.dtype == torch.float32
