"""Loss scale normalisation (issue #9, 6e): the feature loss scaled to a 256-channel FPN, the response
BCE to 80 classes, against independent numpy / pure-Python computations on hand-built inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gid_core.config import DistillConfig
from gid_core.losses import REFERENCE_CHANNELS, REFERENCE_CLASSES, feature_loss, response_loss

from tests.gid_core.test_distill import _batch, _model


def feature_by_numpy(t: np.ndarray, s: np.ndarray, per_channel_reference: int | None) -> float:
    """The paper's loss: squared L2 over channels, averaged over instances and cells; with a
    reference R: the mean over channels times R."""
    num, channels, h, w = t.shape
    squared = ((s.astype(np.float64) - t.astype(np.float64)) ** 2).sum(axis=1)  # (K, h, w)
    if per_channel_reference is not None:
        squared = squared / channels * per_channel_reference
    return float(squared.sum() / (num * h * w))


def test_feature_loss_unchanged_at_256_channels() -> None:
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(3, 256, 2, 2, generator=gen, dtype=torch.float64)
    s = torch.randn(3, 256, 2, 2, generator=gen, dtype=torch.float64)
    raw = feature_by_numpy(t.numpy(), s.numpy(), None)
    assert feature_loss(t, s, reference_channels=REFERENCE_CHANNELS).item() == pytest.approx(raw, rel=1e-12)
    assert feature_loss(t, s).item() == pytest.approx(raw, rel=1e-12)


def test_feature_loss_hand_value_and_channel_duplication() -> None:
    # 1 instance, 2 channels, 1x1 cell: (3-1)^2 + (0-1)^2 = 5 over 2 channels -> mean 2.5 -> x256 = 640
    t = torch.tensor([[[[1.0]], [[1.0]]]])
    s = torch.tensor([[[[3.0]], [[0.0]]]])
    assert feature_loss(t, s, reference_channels=256).item() == pytest.approx(640.0)
    gen = torch.Generator().manual_seed(1)
    t = torch.randn(4, 8, 3, 3, generator=gen, dtype=torch.float64)
    s = torch.randn(4, 8, 3, 3, generator=gen, dtype=torch.float64)
    base = feature_loss(t, s, reference_channels=REFERENCE_CHANNELS, normalizer=3)
    assert base.item() == pytest.approx(feature_by_numpy(t.numpy(), s.numpy(), 256) * 4 / 3, rel=1e-12)
    # A teacher FPN with every channel twice (and an adapter to match): the same loss.
    t2, s2 = torch.cat([t, t], dim=1), torch.cat([s, s], dim=1)
    doubled = feature_loss(t2, s2, reference_channels=REFERENCE_CHANNELS, normalizer=3)
    assert doubled.item() == pytest.approx(base.item(), rel=1e-12)
    assert feature_loss(t2, s2, normalizer=3).item() == pytest.approx(2 * feature_loss(t, s, normalizer=3).item())


def bce_sum_by_hand(t_logits: list[float], s_logits: list[float]) -> float:
    total = 0.0
    for tl, sl in zip(t_logits, s_logits):
        p = 1.0 / (1.0 + math.exp(-tl))
        q = 1.0 / (1.0 + math.exp(-sl))
        total -= p * math.log(q) + (1.0 - p) * math.log(1.0 - q)
    return total


def _response_inputs(classes: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(2, 3, classes, generator=gen, dtype=torch.float64) * 2
    s_logits = torch.randn(2, 3, classes, generator=gen, dtype=torch.float64) * 2
    t_reg = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    s_reg = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, True, False]])
    return t_logits, s_logits, t_reg, s_reg, mask


def test_response_bce_unchanged_at_80_classes() -> None:
    t_logits, s_logits, t_reg, s_reg, mask = _response_inputs(REFERENCE_CLASSES)
    rows = [(0, 0), (0, 2), (1, 1)]
    by_hand = sum(bce_sum_by_hand(t_logits[n, r].tolist(), s_logits[n, r].tolist()) for n, r in rows) / 3
    cls, reg = response_loss(t_logits, s_logits, t_reg, s_reg, mask, num_classes=REFERENCE_CLASSES)
    assert cls.item() == pytest.approx(by_hand, rel=1e-10)
    raw_cls, raw_reg = response_loss(t_logits, s_logits, t_reg, s_reg, mask)
    assert raw_cls.item() == pytest.approx(by_hand, rel=1e-10)
    assert reg.item() == raw_reg.item()  # box regression has no class dimension


def test_response_bce_scaled_by_class_count_and_duplication_invariant() -> None:
    t_logits, s_logits, t_reg, s_reg, mask = _response_inputs(3, seed=2)
    rows = [(0, 0), (0, 2), (1, 1)]
    by_hand = sum(bce_sum_by_hand(t_logits[n, r].tolist(), s_logits[n, r].tolist()) for n, r in rows) / 3
    cls, _ = response_loss(t_logits, s_logits, t_reg, s_reg, mask, num_classes=3)
    assert cls.item() == pytest.approx(by_hand * 80 / 3, rel=1e-10)
    # every class duplicated (6 classes): the same loss
    cls2, _ = response_loss(
        torch.cat([t_logits, t_logits], -1), torch.cat([s_logits, s_logits], -1), t_reg, s_reg, mask, num_classes=6
    )
    assert cls2.item() == pytest.approx(cls.item(), rel=1e-12)


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_distiller_scales_to_the_reference_shapes(arch: str) -> None:
    """The same step, normalised and raw: feature x 256 / teacher channels; response BCE x 80 /
    the student's 3 classes, except Faster R-CNN's class-agnostic RPN objectness (x 1)."""
    from gid_core.distill import GIDDistiller

    images, targets = _batch()
    out = {}
    for normalize in (True, False):
        torch.manual_seed(0)
        teacher, student = _model(arch, "resnet18", fpn=64), _model(arch, "resnet18", fpn=32)
        d = GIDDistiller(teacher, student, DistillConfig(normalize_losses=normalize)).train()
        out[normalize] = {k: v.detach() for k, v in d(images, targets).items()}
    teacher_channels = 64  # FCOS is built with >= 64 channels too
    torch.testing.assert_close(out[True]["loss_feature"], out[False]["loss_feature"] * 256 / teacher_channels)
    cls_scale = 1.0 if arch == "fasterrcnn" else 80 / 3
    torch.testing.assert_close(out[True]["loss_response_cls"], out[False]["loss_response_cls"] * cls_scale)
    for name in ("loss_relation", "loss_response_reg"):
        torch.testing.assert_close(out[True][name], out[False][name])
