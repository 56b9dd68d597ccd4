"""Issue #12 item 3: the peer methods beside GID (``DistillConfig.method``), checked against
independent computations on hand-built inputs, then one real distillation step per method."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from gid_core.config import DistillConfig, ModelConfig
from gid_core.distill import GIDDistiller
from gid_core.losses import fitnet_loss, response_loss
from gid_core.models import build_detector

SIZE = 64


# ----------------------------------------------------------------------------- the losses


def test_fitnet_loss_is_mean_channel_sum_over_every_position():
    # Two levels, hand-built: every difference is known.
    t = [torch.zeros(2, 4, 2, 2), torch.zeros(2, 4, 1, 1)]
    s = [torch.full((2, 4, 2, 2), 1.0), torch.full((2, 4, 1, 1), 3.0)]
    # channel sums: level 0: 4 * 1 at 2*2*2 = 8 positions; level 1: 4 * 9 at 2 positions
    expected = (8 * 4.0 + 2 * 36.0) / (8 + 2)
    assert fitnet_loss(t, s).item() == pytest.approx(expected)
    # scaled to 256 channels: 256 / 4 times the sum; a given normaliser replaces the 10 positions
    assert fitnet_loss(t, s, reference_channels=256).item() == pytest.approx(expected * 64)
    assert fitnet_loss(t, s, normalizer=4.0).item() == pytest.approx(expected * 10 / 4)


def test_fitnet_loss_gradient_and_teacher_detached():
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)]
    s = [torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)]
    fitnet_loss(t, s).backward()
    assert t[0].grad is None
    torch.testing.assert_close(s[0].grad, 2 * (s[0] - t[0]).detach() / 32)
    with pytest.raises(ValueError, match="fitnet_loss"):
        fitnet_loss([torch.zeros(1, 2, 3, 3)], [torch.zeros(1, 2, 3, 4)])


def test_dense_response_is_response_loss_over_every_position():
    g = torch.Generator().manual_seed(1)
    t_logits, s_logits = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    t_reg, s_reg = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    cls, reg = response_loss(t_logits, s_logits, t_reg, s_reg, mask, normalizer=10, num_classes=3)
    p = torch.sigmoid(t_logits)
    bce = -(p * F.logsigmoid(s_logits) + (1 - p) * F.logsigmoid(-s_logits))
    assert cls.item() == pytest.approx(bce.sum().item() * 80 / 3 / 10, rel=1e-5)
    assert reg.item() == pytest.approx((s_reg - t_reg).abs().sum().item() / 10, rel=1e-5)


# ----------------------------------------------------------------------------- one step


def _model(backbone: str, fpn: int) -> nn.Module:
    cfg = ModelConfig(arch="retinanet", backbone=backbone, num_classes=3, fpn_channels=fpn, min_size=SIZE,
                      max_size=SIZE)
    return build_detector(cfg)


def _distiller(**cfg) -> GIDDistiller:
    torch.manual_seed(0)
    return GIDDistiller(_model("resnet34", 64), _model("resnet18", 32), DistillConfig(**cfg)).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 6.0, 30.0, 34.0]]), "labels": torch.tensor([2])} for _ in range(2)]
    return images, targets


def _outputs(d: GIDDistiller, images, targets):
    image_list, targets = d.student.transform(images, targets)
    with torch.no_grad():
        t_out = d.view(d.teacher, image_list, d._anchors)
        s_out = d.view(d.student, image_list, d._anchors, targets)
    return t_out, s_out


def test_fitnet_step_imitates_whole_maps_through_the_adapter():
    d = _distiller(method="fitnet")
    images, targets = _batch()
    losses = d(images, targets)
    assert "loss_fitnet" in losses
    assert not {"loss_feature", "loss_relation", "loss_response_cls", "loss_dense_response_cls"} & losses.keys()
    assert "gi_per_image" not in d.last_stats  # no GI selection ran
    # independent: the adapter on every student map, squared error summed, per position, x 256 / 64
    t_out, s_out = _outputs(d, images, targets)
    with torch.no_grad():
        squared = sum((d.adapter(s) - t).pow(2).sum() for s, t in zip(s_out.features, t_out.features))
        positions = 2 * sum(f.shape[-2] * f.shape[-1] for f in t_out.features)
        expected = 5e-4 * squared * (256 / 64) / positions
    torch.testing.assert_close(losses["loss_fitnet"], expected, rtol=1e-4, atol=0)
    losses["loss_fitnet"].backward()
    assert d.adapter.weight.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.backbone.parameters())
    assert all(p.grad is None for p in d.student.head.parameters())  # maps only: the head is not distilled
    assert all(p.grad is None for p in d.teacher.parameters())


def test_dense_response_step_distils_every_prediction():
    d = _distiller(method="dense_response")
    images, targets = _batch()
    losses = d(images, targets)
    assert {"loss_dense_response_cls", "loss_dense_response_reg"} <= losses.keys()
    assert not {"loss_fitnet", "loss_relation", "loss_response_cls"} & losses.keys()
    assert losses["loss_feature"].item() == 0.0  # the adapter stays in the graph for DDP, at 0
    # independent: BCE and L1 over every anchor of both images, divided by their number
    t_out, s_out = _outputs(d, images, targets)
    p = torch.sigmoid(t_out.logits)
    bce = -(p * F.logsigmoid(s_out.logits) + (1 - p) * F.logsigmoid(-s_out.logits)).sum()
    positions = s_out.reg.shape[0] * s_out.reg.shape[1]
    cls_logit_columns = 3 + 1  # RetinaNet's logits keep column 0 (unused); 3 classes
    assert s_out.logits.shape[-1] == cls_logit_columns
    torch.testing.assert_close(losses["loss_dense_response_cls"], 0.1 * bce * (80 / 3) / positions, rtol=1e-4, atol=0)
    l1 = (s_out.reg - t_out.reg).abs().sum()
    torch.testing.assert_close(losses["loss_dense_response_reg"], 1.0 * l1 / positions, rtol=1e-4, atol=0)
    (losses["loss_dense_response_cls"] + losses["loss_dense_response_reg"] + losses["loss_feature"]).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.head.parameters())
    assert d.adapter.weight.grad is not None and d.adapter.weight.grad.abs().sum() == 0


def test_gid_stays_the_default_method():
    d = _distiller()
    losses = d(*_batch())
    assert {"loss_feature", "loss_relation", "loss_response_cls", "loss_response_reg"} <= losses.keys()
    assert not {"loss_fitnet", "loss_dense_response_cls"} & losses.keys()


# ----------------------------------------------------------------------------- configuration and API


def test_method_is_validated_and_carried_by_the_job_request():
    from service.schemas import JobCreate

    with pytest.raises(ValidationError) as err:
        DistillConfig(method="kd")
    assert err.value.errors()[0]["loc"] == ("method",)
    body = {"kind": "distill", "student": {"arch": "retinanet", "num_classes": 3}, "train_dataset": "ds",
            "hyperparameters": {"distill": {"method": "fitnet"}}}
    assert JobCreate.model_validate(body).hyperparameters.distill.method == "fitnet"
    schema = JobCreate.model_json_schema()
    assert set(schema["$defs"]["DistillConfig"]["properties"]["method"]["enum"]) == {"gid", "fitnet", "dense_response"}
    body["hyperparameters"]["distill"]["method"] = "kd"
    with pytest.raises(ValidationError) as err:
        JobCreate.model_validate(body)
    assert err.value.errors()[0]["loc"] == ("hyperparameters", "distill", "method")
