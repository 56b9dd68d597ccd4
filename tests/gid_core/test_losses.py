"""GID losses against independent pure-Python / numpy computations on hand-built inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gid_core.losses import feature_loss, relation_loss, relation_loss_batched, response_loss


# ----------------------------------------------------------------------------- feature_loss
def feature_reference(t: np.ndarray, s: np.ndarray, k: float) -> float:
    num, channels, h, w = t.shape
    total = 0.0
    for i in range(num):
        for c in range(channels):
            for y in range(h):
                for x in range(w):
                    total += (float(s[i, c, y, x]) - float(t[i, c, y, x])) ** 2
    return total / (k * h * w)


def test_feature_loss_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(3, 4, 2, 5, generator=gen, dtype=torch.float64)
    s = torch.randn(3, 4, 2, 5, generator=gen, dtype=torch.float64)
    expected = feature_reference(t.numpy(), s.numpy(), 3)
    assert feature_loss(t, s).item() == pytest.approx(expected, rel=1e-12)
    # Hand value: one instance, one channel, 1x2 cells: ((3-1)^2 + (0-1)^2) / (1 * 1 * 2) = 2.5
    assert feature_loss(torch.tensor([[[[1.0, 1.0]]]]), torch.tensor([[[[3.0, 0.0]]]])).item() == 2.5


def test_feature_loss_normalizer_and_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    expected = feature_reference(t.detach().numpy(), s.detach().numpy(), 7)
    loss = feature_loss(t, s, normalizer=7)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert feature_loss(t, s, normalizer=torch.tensor(7.0)).item() == pytest.approx(expected, rel=1e-12)
    # A fractional normalizer (global count / world size) is used as given.
    half = feature_reference(t.detach().numpy(), s.detach().numpy(), 0.5)
    assert feature_loss(t, s, normalizer=0.5).item() == pytest.approx(half, rel=1e-12)
    loss.backward()
    assert t.grad is None  # the teacher is a target
    torch.testing.assert_close(s.grad, 2 * (s - t).detach() / (7 * 16))


def test_feature_loss_empty_is_connected_zero() -> None:
    s = torch.zeros(0, 3, 4, 4, requires_grad=True)
    for loss in (feature_loss(torch.zeros(0, 3, 4, 4), s), feature_loss(torch.zeros(0, 3, 4, 4), s, normalizer=5)):
        assert loss.item() == 0.0 and loss.requires_grad and loss.dim() == 0
        loss.backward()
    assert s.grad is not None and s.grad.shape == s.shape


def test_feature_loss_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="feature_loss"):
        feature_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 5, 4, 4))


# ----------------------------------------------------------------------------- relation_loss
def relation_reference(t: list[list[float]], s: list[list[float]]) -> float:
    """Double loop over ordered pairs i != j with math.dist and an explicit smooth L1 (beta 1)."""
    k = len(t)
    if k < 2:
        return 0.0

    def normalised(x: list[list[float]]) -> dict[tuple[int, int], float]:
        d = {(i, j): math.dist(x[i], x[j]) for i in range(k) for j in range(k) if i != j}
        mean = sum(d.values()) / len(d)
        return {key: v / mean for key, v in d.items()}

    pt, ps = normalised(t), normalised(s)
    total = 0.0
    for key in pt:
        diff = abs(ps[key] - pt[key])
        total += 0.5 * diff * diff if diff < 1.0 else diff - 0.5
    return total / (k * (k - 1))


def test_relation_loss_hand_value() -> None:
    # Teacher: 3-4-5 triangle, mean distance 4 -> phi_t = .75 (0,1), 1 (0,2), 1.25 (1,2).
    # Student (3-D, a different D): unit right triangle, distances 1, 1, sqrt 2, mean (2 + sqrt 2)/3
    # -> phi_s = 3/(2+sqrt2) = .878680 (0,1), (0,2) and 3 sqrt2/(2+sqrt2) = 1.242641 (1,2).
    # All |differences| < 1: 0.5 d^2 = .0082791, .0073593, .0000271; each pair twice, / (3*2):
    # loss = (.0082791 + .0073593 + .0000271) / 3 = .0052219.
    t = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    r = 3 / (2 + math.sqrt(2))
    by_hand = (0.5 * (r - 0.75) ** 2 + 0.5 * (r - 1.0) ** 2 + 0.5 * (math.sqrt(2) * r - 1.25) ** 2) / 3
    assert by_hand == pytest.approx(0.0052219, abs=1e-7)
    assert relation_loss(t, s).item() == pytest.approx(by_hand, rel=1e-9)
    assert relation_loss(t, s).item() == pytest.approx(relation_reference(t.tolist(), s.tolist()), rel=1e-9)


def test_relation_loss_linear_branch_and_coincident_embeddings() -> None:
    # Teacher on a line at 0, 1, 2: distances 1, 2, 1, mean 4/3 -> phi .75 (0,1), 1.5 (0,2), .75 (1,2).
    # Student at 0, 1, 0: distances 1, 0, 1, mean 2/3 -> phi 1.5, 0, 1.5.
    # |diff| = .75 (quadratic: .28125), 1.5 (linear: 1.0), .75 (.28125) -> loss 1.5625 / 3.
    t = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    s = torch.tensor([[0.0], [1.0], [0.0]], dtype=torch.float64, requires_grad=True)
    loss = relation_loss(t, s)
    assert loss.item() == pytest.approx(1.5625 / 3, abs=1e-5)  # eps-sized distance for (0, 2)
    loss.backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_relation_loss_matches_double_loop_random() -> None:
    gen = torch.Generator().manual_seed(0)
    for k in (2, 3, 5, 8):
        t = torch.randn(k, 4, 3, 3, generator=gen, dtype=torch.float64) * 3
        s = torch.randn(k, 6, 2, 2, generator=gen, dtype=torch.float64)
        s[0] += 10.0  # one far-away instance: some |phi_s - phi_t| > 1 (linear branch)
        expected = relation_reference(t.flatten(1).tolist(), s.flatten(1).tolist())
        assert relation_loss(t, s).item() == pytest.approx(expected, rel=1e-9)
        if k > 2:
            assert expected > 0.0


def test_relation_loss_fewer_than_two_instances() -> None:
    for k in (0, 1):
        s = torch.randn(k, 8, requires_grad=True)
        loss = relation_loss(torch.randn(k, 8), s)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()


def test_relation_loss_gradients() -> None:
    gen = torch.Generator().manual_seed(2)
    t = torch.randn(4, 16, generator=gen, requires_grad=True)
    s = torch.randn(4, 16, generator=gen, requires_grad=True)
    relation_loss(t, s).backward()
    assert t.grad is None  # the teacher is a target
    assert torch.isfinite(s.grad).all() and (s.grad.abs().sum(dim=1) > 0).all()


def test_relation_loss_identical_embeddings_are_finite() -> None:
    t = torch.randn(3, 5)
    s = torch.ones(3, 5, requires_grad=True)
    loss = relation_loss(t, s)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()
    same = relation_loss(torch.ones(3, 5), torch.ones(3, 5))
    assert same.item() == 0.0


def test_relation_loss_is_scale_invariant() -> None:
    gen = torch.Generator().manual_seed(3)
    t = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    s = torch.randn(5, 12, generator=gen, dtype=torch.float64)
    base = relation_loss(t, s).item()
    assert base > 0.0
    assert relation_loss(t, s * 5).item() == pytest.approx(base, rel=1e-9)
    assert relation_loss(t * 0.1, s).item() == pytest.approx(base, rel=1e-9)
    assert relation_loss(t, s + 3.0).item() == pytest.approx(base, rel=1e-9)  # and translation


# ----------------------------------------------------------------------------- relation_loss_batched
def batch_with_counts(counts: list[int], dtype: torch.dtype, seed: int = 0):
    """Instances of len(counts) images, interleaved in a shuffled order."""
    gen = torch.Generator().manual_seed(seed)
    image_index = torch.cat([torch.full((c,), i, dtype=torch.int64) for i, c in enumerate(counts)])
    image_index = image_index[torch.randperm(len(image_index), generator=gen)]
    t = torch.randn(len(image_index), 8, 2, 2, generator=gen, dtype=dtype) * 2
    s = torch.randn(len(image_index), 5, 3, generator=gen, dtype=dtype)
    return t, s, image_index


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_relation_loss_batched_equals_mean_of_per_image(dtype: torch.dtype, rtol: float) -> None:
    counts = [3, 1, 0, 5, 2]  # images 1 and 2 have < 2 GIs and do not count
    t, s, image_index = batch_with_counts(counts, dtype)
    s_batched = s.clone().requires_grad_(True)
    s_single = s.clone().requires_grad_(True)
    batched = relation_loss_batched(t, s_batched, image_index, len(counts))
    per_image = [relation_loss(t[image_index == i], s_single[image_index == i]) for i in (0, 3, 4)]
    expected = sum(per_image) / 3
    assert batched.item() == pytest.approx(expected.item(), rel=rtol)
    # also against the pure-Python double loop
    ref = sum(
        relation_reference(t[image_index == i].flatten(1).tolist(), s[image_index == i].flatten(1).tolist())
        for i in (0, 3, 4)
    ) / 3
    assert batched.item() == pytest.approx(ref, rel=rtol)
    batched.backward()
    expected.backward()
    torch.testing.assert_close(s_batched.grad, s_single.grad, rtol=rtol, atol=rtol * 1e-2)


def test_relation_loss_batched_normalizer() -> None:
    t, s, image_index = batch_with_counts([3, 4], torch.float64, seed=1)
    total = sum(relation_loss(t[image_index == i], s[image_index == i]) for i in range(2)).item()
    assert relation_loss_batched(t, s, image_index, 2, normalizer=5).item() == pytest.approx(total / 5, rel=1e-9)
    got = relation_loss_batched(t, s, image_index, 2, normalizer=torch.tensor(4.0)).item()
    assert got == pytest.approx(total / 4, rel=1e-9)
    got = relation_loss_batched(t, s, image_index, 2, normalizer=torch.tensor(0.5)).item()
    assert got == pytest.approx(total / 0.5, rel=1e-9)  # fractional: used as given


def test_relation_loss_batched_identical_embeddings_are_finite() -> None:
    image_index = torch.tensor([0, 0, 0, 1, 1])
    s = torch.ones(5, 4, requires_grad=True)
    loss = relation_loss_batched(torch.randn(5, 4), s, image_index, 2)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("counts", [[1, 0, 1], [0, 0]])
def test_relation_loss_batched_no_valid_image_is_connected_zero(counts: list[int]) -> None:
    t, s, image_index = batch_with_counts(counts, torch.float32)
    s.requires_grad_(True)
    for normalizer in (None, 0, 3):
        loss = relation_loss_batched(t, s, image_index, len(counts), normalizer=normalizer)
        assert loss.item() == 0.0 and loss.requires_grad and loss.dim() == 0
        loss.backward()
    if s.numel():
        assert torch.equal(s.grad, torch.zeros_like(s))


def test_relation_loss_batched_teacher_gets_no_gradient() -> None:
    t, s, image_index = batch_with_counts([3, 2], torch.float32)
    t.requires_grad_(True)
    s.requires_grad_(True)
    relation_loss_batched(t, s, image_index, 2).backward()
    assert t.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_relation_loss_batched_bad_image_index() -> None:
    with pytest.raises(ValueError, match="image_index"):
        relation_loss_batched(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="image_index"):
        relation_loss_batched(torch.randn(3, 4), torch.randn(3, 4), torch.zeros(3), 1)
    with pytest.raises(ValueError, match="same K"):
        relation_loss(torch.randn(3, 4), torch.randn(2, 4))


# ----------------------------------------------------------------------------- response_loss
def bce_by_hand(x: float, t_logit: float) -> float:
    p = 1.0 / (1.0 + math.exp(-t_logit))
    sig = 1.0 / (1.0 + math.exp(-x))
    return -(p * math.log(sig) + (1.0 - p) * math.log(1.0 - sig))


def response_case(requires_grad: bool = False):
    # N = 2 images x R = 3 predictions, C = 2 classes.
    t_logits = torch.tensor([[[2.0, -1.0], [0.0, 0.5], [-3.0, 1.0]], [[1.0, 1.0], [-0.5, 2.5], [0.3, -0.7]]])
    s_logits = torch.tensor([[[0.5, 0.5], [1.0, -2.0], [0.0, 0.0]], [[-1.0, 2.0], [0.2, 0.1], [1.5, -1.5]]])
    t_reg = torch.tensor([[[0.0, 1.0, 2.0, 3.0]] * 3, [[1.0, 1.0, 1.0, 1.0]] * 3])
    s_reg = torch.tensor([[[0.5, 0.0, 2.0, 5.0]] * 3, [[1.0, -1.0, 3.0, 1.5]] * 3])
    mask = torch.tensor([[True, False, True], [False, False, True]])
    s_logits.requires_grad_(requires_grad)
    s_reg.requires_grad_(requires_grad)
    return t_logits, s_logits, t_reg, s_reg, mask


def test_response_loss_matches_formula() -> None:
    t_logits, s_logits, t_reg, s_reg, mask = response_case()
    rows = [(0, 0), (0, 2), (1, 2)]
    cls_by_hand = sum(
        bce_by_hand(s_logits[n, r, c].item(), t_logits[n, r, c].item()) for n, r in rows for c in range(2)
    ) / 3
    # L1 of rows (0,0) and (0,2): |.5| + |-1| + 0 + |2| = 3.5 each; row (1,2): 0 + 2 + 2 + .5 = 4.5
    reg_by_hand = (3.5 + 3.5 + 4.5) / 3
    cls, reg = response_loss(t_logits, s_logits, t_reg, s_reg, mask)
    assert cls.dim() == 0 and reg.dim() == 0
    assert cls.item() == pytest.approx(cls_by_hand, rel=1e-6)
    assert reg.item() == pytest.approx(reg_by_hand, rel=1e-6)
    cls4, reg4 = response_loss(t_logits, s_logits, t_reg, s_reg, mask, normalizer=4)
    assert cls4.item() == pytest.approx(cls_by_hand * 3 / 4, rel=1e-6)
    assert reg4.item() == pytest.approx(reg_by_hand * 3 / 4, rel=1e-6)
    # max(1, normalizer): below 1 divides by 1
    cls_half, _ = response_loss(t_logits, s_logits, t_reg, s_reg, mask, normalizer=torch.tensor(0.5))
    assert cls_half.item() == pytest.approx(cls_by_hand * 3, rel=1e-6)


def test_response_loss_empty_mask_is_connected_zero() -> None:
    t_logits, s_logits, t_reg, s_reg, mask = response_case(requires_grad=True)
    cls, reg = response_loss(t_logits, s_logits, t_reg, s_reg, torch.zeros_like(mask))
    assert cls.item() == 0.0 and reg.item() == 0.0 and cls.requires_grad and reg.requires_grad
    (cls + reg).backward()
    assert torch.equal(s_logits.grad, torch.zeros_like(s_logits))
    assert torch.equal(s_reg.grad, torch.zeros_like(s_reg))


def test_response_loss_gradient_only_at_masked_rows() -> None:
    t_logits, s_logits, t_reg, s_reg, mask = response_case(requires_grad=True)
    t_logits.requires_grad_(True)
    t_reg.requires_grad_(True)
    cls, reg = response_loss(t_logits, s_logits, t_reg, s_reg, mask)
    (cls + reg).backward()
    assert t_logits.grad is None and t_reg.grad is None
    # d BCE / dx = sigmoid(x) - p, divided by the 3 selected rows
    expected = torch.where(mask[..., None], (torch.sigmoid(s_logits) - torch.sigmoid(t_logits)) / 3, 0.0)
    torch.testing.assert_close(s_logits.grad, expected.detach())
    assert (s_reg.grad[~mask] == 0).all() and (s_reg.grad[mask] != 0).any()
    torch.testing.assert_close(s_reg.grad[mask], torch.sign(s_reg - t_reg).detach()[mask] / 3)


def test_response_loss_bad_shapes() -> None:
    t_logits, s_logits, t_reg, s_reg, mask = response_case()
    with pytest.raises(ValueError, match="mask must be bool"):
        response_loss(t_logits, s_logits, t_reg, s_reg, mask.float())
    with pytest.raises(ValueError, match="t_logits and s_logits"):
        response_loss(t_logits, s_logits[:1], t_reg, s_reg, mask)
    with pytest.raises(ValueError, match="t_reg and s_reg"):
        response_loss(t_logits, s_logits, t_reg[..., :2], s_reg[..., :2], mask)
