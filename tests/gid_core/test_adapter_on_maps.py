"""``DistillConfig.adapter_on = "maps"``: the adapter on the student's FPN maps, then pooling.

``pooled_sum_of_squares`` (both of its forms) and the distiller's feature loss are checked against
independent computations with ``torchvision.ops.roi_align`` and ``torch.nn.functional.conv2d``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

import gid_core.roi
from gid_core.config import DistillConfig, ModelConfig
from gid_core.distill import GIDDistiller
from gid_core.losses import REFERENCE_CHANNELS
from gid_core.models import build_detector
from gid_core.roi import pooled_sum_of_squares

STRIDES = [8, 16, 32]


def _roi_align_sum_of_squares(maps, rois, level_index, *, output_size, sampling_ratio):
    total = maps[0].new_zeros(())
    for lvl, (feature, stride) in enumerate(zip(maps, STRIDES)):
        rows = level_index == lvl
        if rows.any():
            pooled = roi_align(feature, rois[rows], output_size, spatial_scale=1.0 / stride,
                               sampling_ratio=sampling_ratio, aligned=True)
            total = total + pooled.pow(2).sum()
    return total


def _case(seed: int, num_images: int = 3, channels: int = 5):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(num_images, channels, 64 // s, 64 // s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in STRIDES]
    k = 17
    xy = torch.rand(k, 2, generator=g, dtype=torch.float64) * 76 - 6  # some boxes start outside the map
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * 40 + 0.5
    image_index = torch.randint(0, num_images, (k,), generator=g)
    image_index[image_index == 1] = 0  # image 1 has no rois
    rois = torch.cat([image_index[:, None].to(torch.float64), xy, xy + wh], dim=1)
    level_index = torch.randint(0, len(STRIDES), (k,), generator=g)
    level_index[level_index == 2] = 1  # level 2 has no rois
    per_level = torch.bincount(level_index * num_images + image_index, minlength=len(STRIDES) * num_images)
    return maps, rois, level_index, per_level.view(len(STRIDES), num_images).tolist()


@pytest.mark.parametrize("form", ["quadratic", "pooling", "chosen"])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_pooled_sum_of_squares_matches_roi_align(monkeypatch, form: str, sampling_ratio: int, seed: int):
    """Each form, and the per-level choice between them, gives roi_align's sum and gradient."""
    if form == "pooling":
        monkeypatch.setattr(gid_core.roi, "_MAX_QUADRATIC_ELEMENTS", 0)
    elif form == "quadratic":
        monkeypatch.setattr(gid_core.roi, "_quadratic_form_pays", lambda **_: True)
    maps, rois, level_index, per_level = _case(seed)
    pool = dict(output_size=6, sampling_ratio=sampling_ratio)
    got = pooled_sum_of_squares(maps, rois, level_index, STRIDES, per_level, **pool)
    expected = _roi_align_sum_of_squares(maps, rois, level_index, **pool)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = [torch.autograd.grad(x, maps, allow_unused=True) for x in (got, expected)]
    for a, b in zip(*grads):
        assert (a is None) == (b is None)  # level 2 holds no rois
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_quadratic_form_is_chosen_on_small_maps_and_never_past_its_memory_cap():
    kw = dict(num_images=8, max_per_image=40, num_rois=300, output_size=10, channels=128)
    assert gid_core.roi._quadratic_form_pays(height=8, width=8, **kw)  # a 64 px input's P3
    assert not gid_core.roi._quadratic_form_pays(height=100, width=136, **kw)  # an 800 px input's P3
    assert not gid_core.roi._quadratic_form_pays(height=8, width=8, **{**kw, "num_rois": 1, "max_per_image": 1})


def test_pooled_sum_of_squares_without_rois_is_zero_and_float32_at_least():
    maps = [torch.randn(2, 3, 8, 8, dtype=torch.float16)]
    got = pooled_sum_of_squares(maps, torch.zeros((0, 5)), torch.zeros(0, dtype=torch.int64), [8], [[0, 0]],
                                output_size=4, sampling_ratio=2)
    assert got.dtype == torch.float32 and got.item() == 0.0


# ----------------------------------------------------------------------------- the distiller

SIZE = 64


def _distiller(**cfg) -> GIDDistiller:
    def model(backbone, fpn):
        return build_detector(ModelConfig(arch="retinanet", backbone=backbone, num_classes=3, fpn_channels=fpn,
                                          min_size=SIZE, max_size=SIZE))

    torch.manual_seed(0)
    return GIDDistiller(model("resnet34", 64), model("resnet18", 32), DistillConfig(**cfg)).train()


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(3)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])} for _ in range(3)]
    return images, targets


def _independent_feature_loss(d: GIDDistiller, images, targets):
    """adapter(S) pooled minus T pooled, by roi_align on each GI's level, on the distiller's own GIs,
    normalised as the feature loss (mean over GIs and cells, channels read as 256)."""
    image_list, targets = d.student.transform(images, targets)
    with torch.no_grad():
        t_out = d.view(d.teacher, image_list, d._anchors)
    s_out = d.view(d.student, image_list, d._anchors, targets)
    gi = d.select_instances(t_out, s_out)
    level_index, strides = d._instance_levels(t_out, gi.boxes, image_list)
    rois = torch.cat([gi.image_index[:, None].float(), gi.boxes], dim=1)
    cfg, total = d.config, 0.0
    for lvl, (t, s, stride) in enumerate(zip(t_out.features, s_out.features, strides)):
        rows = level_index == lvl
        if rows.any():
            adapted = F.conv2d(s, d.adapter.weight, d.adapter.bias, padding=1)
            pool = lambda x: roi_align(x, rois[rows], cfg.roi_output_size, spatial_scale=1.0 / stride,  # noqa: E731
                                       sampling_ratio=cfg.roi_sampling_ratio, aligned=True)
            total = total + (pool(adapted) - pool(t)).pow(2).sum()
    channels = t_out.features[0].shape[1]
    assert len(gi.boxes) > 0 and level_index.unique().numel() >= 2  # GIs on two levels at least
    return total * (REFERENCE_CHANNELS / channels) / (len(gi.boxes) * cfg.roi_output_size**2)


@pytest.mark.parametrize("top_k", [5, 40])
def test_maps_feature_loss_is_adapt_then_pool(top_k: int):
    """The loss and its gradients (student and adapter) equal roi_align over the adapted maps."""
    d = _distiller(adapter_on="maps", top_k=top_k)
    images, targets = _batch()
    params = [d.adapter.weight, d.adapter.bias, *d.student.backbone.fpn.parameters()]
    got = d(images, targets)["loss_feature"] / d.config.weight_feature
    expected = _independent_feature_loss(d, images, targets)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    grads = [torch.autograd.grad(x, params, allow_unused=True) for x in (got, expected)]
    assert grads[1][0] is not None and any(g is not None for g in grads[1][2:])  # adapter and student
    for a, b in zip(*grads):
        assert (a is None) == (b is None)  # FPN levels without GIs
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * max(1.0, float(b.abs().max())))


def test_maps_leaves_the_other_losses_unchanged_and_differs_from_instances():
    """Only the feature loss depends on where the adapter runs; the two orders are different
    computations (zero padding at the patch border, bins of map cells)."""
    images, targets = _batch()
    on_maps = _distiller(adapter_on="maps")(images, targets)
    on_instances = _distiller(adapter_on="instances")(images, targets)
    assert on_maps.keys() == on_instances.keys()
    for name in on_maps:
        if name != "loss_feature":
            torch.testing.assert_close(on_maps[name], on_instances[name], msg=name)
    assert not torch.allclose(on_maps["loss_feature"], on_instances["loss_feature"], rtol=1e-5, atol=0.0)


def test_maps_without_general_instances_keeps_the_adapter_in_the_graph():
    d = _distiller(adapter_on="maps", use_relation=False, use_response=False)
    images, targets = _batch()
    d.select_instances = lambda t, s: GIDDistiller.select_instances(d, t, s)._replace(  # no GIs at all
        boxes=torch.zeros((0, 4)), scores=torch.zeros(0), counts=torch.zeros(3, dtype=torch.int64),
        image_index=torch.zeros(0, dtype=torch.int64))
    loss = d(images, targets)["loss_feature"]
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, [d.adapter.weight])
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_maps_under_autocast_and_on_faster_rcnn(arch: str):
    """Under autocast (bfloat16 maps) the feature loss stays float32, finite and as close to the
    instances order's as in float32 (the bfloat16 forward itself moves both); Faster R-CNN's RPN
    levels take the same path."""
    def model(backbone, fpn):
        return build_detector(ModelConfig(arch=arch, backbone=backbone, num_classes=3, fpn_channels=fpn,
                                          min_size=SIZE, max_size=SIZE))

    def feature_loss(adapter_on: str):
        torch.manual_seed(0)
        d = GIDDistiller(model("resnet34", 64), model("resnet18", 32), DistillConfig(adapter_on=adapter_on)).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return d, d(*_batch())["loss_feature"]

    d, on_maps = feature_loss("maps")
    _, on_instances = feature_loss("instances")
    assert on_maps.dtype == torch.float32 and torch.isfinite(on_maps)
    torch.testing.assert_close(on_maps, on_instances, rtol=0.01, atol=0.0)
    on_maps.backward()
    assert d.adapter.weight.grad is not None and torch.isfinite(d.adapter.weight.grad).all()
