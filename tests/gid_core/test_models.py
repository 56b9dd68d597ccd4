"""Detector builders: every arch x backbone builds a plain torchvision detector, loads weights safely."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from gid_core.config import ModelConfig
from gid_core.models import build_detector, load_state_dict_file, save_state_dict_file

SIZE = 64


def _cfg(arch: str, backbone: str = "resnet18", **kw) -> ModelConfig:
    fpn = 64 if arch == "fcos" else 32
    return ModelConfig(arch=arch, backbone=backbone, num_classes=3, fpn_channels=fpn, min_size=SIZE, max_size=SIZE, **kw)


@pytest.mark.parametrize("arch,cls", [("retinanet", RetinaNet), ("fcos", FCOS), ("fasterrcnn", FasterRCNN)])
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_builds_plain_torchvision_detector_with_aligned_levels(arch, cls, backbone):
    model = build_detector(_cfg(arch, backbone)).eval()
    assert type(model) is cls
    with torch.no_grad():
        features = model.backbone(torch.zeros(1, 3, SIZE, SIZE))
        (out,) = model([torch.rand(3, SIZE, SIZE)])
    strides = [SIZE // f.shape[-1] for f in features.values()]
    # ResNet and MobileNet FPNs expose the same strides, so a MobileNet student can follow a ResNet teacher.
    assert strides == ([8, 16, 32, 64, 64] if arch != "fasterrcnn" else [4, 8, 16, 32, 64])
    assert set(out) == {"boxes", "scores", "labels"}


@pytest.mark.parametrize("backbone", ["resnet34", "resnet50", "resnet101"])
def test_deeper_backbones_and_fpn_width(backbone):
    model = build_detector(_cfg("retinanet", backbone, norm="gn"))
    assert model.backbone.out_channels == 32
    assert isinstance(model.backbone.body.bn1, torch.nn.GroupNorm)


def test_num_classes_includes_background_slot():
    model = build_detector(_cfg("retinanet"))
    assert model.head.classification_head.num_classes == 4  # 3 categories + unused index 0


@pytest.mark.parametrize(
    "arch,stock",
    [
        ("retinanet", torchvision.models.detection.retinanet_resnet50_fpn),
        ("fcos", torchvision.models.detection.fcos_resnet50_fpn),
        ("fasterrcnn", torchvision.models.detection.fasterrcnn_resnet50_fpn),
    ],
)
def test_resnet50_default_config_loads_into_stock_builder(arch, stock):
    ours = build_detector(ModelConfig(arch=arch, num_classes=3))
    reference = stock(weights=None, weights_backbone=None, num_classes=4)
    reference.load_state_dict(ours.state_dict(), strict=True)


def test_small_anchor_sizes():
    model = build_detector(_cfg("retinanet", anchor_sizes=[8, 16, 32, 64, 128]))
    assert model.anchor_generator.sizes[0] == (8, 10, 12)
    with pytest.raises(ValueError, match="5 FPN levels"):
        build_detector(_cfg("retinanet", anchor_sizes=[8, 16]))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_round_trip(tmp_path, suffix):
    model = build_detector(_cfg("retinanet"))
    path = tmp_path / f"w{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_state_dict_file(model.state_dict(), path)
    loaded = build_detector(_cfg("retinanet", weights=str(path)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_mismatched_weights_name_the_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_state_dict_file(build_detector(_cfg("retinanet", "resnet34")).state_dict(), path)
    with pytest.raises(ValueError, match="does not fit the model.*(missing|unexpected)"):
        build_detector(_cfg("retinanet", "resnet18", weights=str(path)))
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_detector(_cfg("retinanet", weights=str(tmp_path / "nope.pt")))


class _Boom:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_file(path)


def test_config_rejects_fcos_with_narrow_fpn_and_bad_sizes():
    with pytest.raises(ValueError, match="fcos"):
        ModelConfig(arch="fcos", num_classes=3, fpn_channels=32)
    with pytest.raises(ValueError, match="max_size"):
        ModelConfig(arch="retinanet", num_classes=3, min_size=800, max_size=400)
