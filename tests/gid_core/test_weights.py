"""torchvision weights by name: every published COCO detector and ImageNet backbone the project
covers loads strictly from stand-in files in a temporary TORCH_HOME. Nothing is downloaded: the
stand-ins are torchvision's own builders with ``weights=None``, saved under torchvision's file names."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
import torchvision.models.detection as tvd
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from gid_core.config import ModelConfig
from gid_core.models import build_detector, load_initial_weights
from gid_core.weights import (
    WeightsError,
    categories_for,
    model_config_for,
    resolve,
    weights_names,
    weights_problems,
)

# torchvision's builder of each detector weights enum
DETECTORS = {
    "RetinaNet_ResNet50_FPN_Weights": tvd.retinanet_resnet50_fpn,
    "RetinaNet_ResNet50_FPN_V2_Weights": tvd.retinanet_resnet50_fpn_v2,
    "FCOS_ResNet50_FPN_Weights": tvd.fcos_resnet50_fpn,
    "FasterRCNN_ResNet50_FPN_Weights": tvd.fasterrcnn_resnet50_fpn,
    "FasterRCNN_ResNet50_FPN_V2_Weights": tvd.fasterrcnn_resnet50_fpn_v2,
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": tvd.fasterrcnn_mobilenet_v3_large_fpn,
    "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights": tvd.fasterrcnn_mobilenet_v3_large_320_fpn,
}
# ImageNet weights enum -> (classifier builder, ModelConfig.backbone)
BACKBONES = {
    "ResNet18_Weights": (tvm.resnet18, "resnet18"),
    "ResNet34_Weights": (tvm.resnet34, "resnet34"),
    "ResNet50_Weights": (tvm.resnet50, "resnet50"),
    "ResNet101_Weights": (tvm.resnet101, "resnet101"),
    "MobileNet_V3_Large_Weights": (tvm.mobilenet_v3_large, "mobilenet_v3_large"),
}
DETECTOR_NAMES = [f"torchvision:{e}.{m.name}" for e in DETECTORS for m in getattr(tvd, e)]
BACKBONE_NAMES = [f"torchvision:{e}.{m.name}" for e in BACKBONES for m in getattr(tvm, e)]


def _member(name: str):
    enum, member = name[len("torchvision:"):].split(".")
    return getattr(tvd if enum in DETECTORS else tvm, enum)[member]


def _cache_file(home: Path, name: str) -> Path:
    return home / "hub" / "checkpoints" / _member(name).url.rsplit("/", 1)[-1]


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME; any download or network connection fails the test."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # no set_dir() override in the way

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to download")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    return home


def _stand_in(home: Path, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    path = _cache_file(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _assert_holds(module: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Every tensor of ``module`` equals the file's ``prefix``-ed one, and every file tensor is used
    but BN step counters (FrozenBatchNorm2d has none) and a classifier's head (not in a body)."""
    own = module.state_dict()
    assert own, "nothing to compare"
    for key, value in own.items():
        assert torch.equal(value, state[prefix + key]), key
    unused = {k for k in state if k[len(prefix):] not in own or not k.startswith(prefix)}
    allowed = ("fc.", "classifier.")
    assert all(k.endswith("num_batches_tracked") or k.startswith(allowed) for k in unused), sorted(unused)[:5]


def test_every_supported_name_is_listed():
    assert weights_names("detector") == DETECTOR_NAMES
    assert weights_names("backbone") == BACKBONE_NAMES
    assert len(DETECTOR_NAMES) == 7 and len(BACKBONE_NAMES) == 8


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_by_name_holds_exactly_the_published_tensors(torch_home, name):
    enum = name[len("torchvision:"):].split(".")[0]
    reference = DETECTORS[enum](weights=None, weights_backbone=None, num_classes=91)
    state = _stand_in(torch_home, name, reference.state_dict())

    cfg = model_config_for(name)
    assert cfg.weights == name and cfg.num_classes == 90  # + 1 = torchvision's 91 outputs
    model = build_detector(cfg)
    _assert_holds(model, state)
    assert type(model) is type(reference)
    # What the state_dict does not show: transform sizes, anchors, P6 source, loss type, BN eps.
    assert model.transform.min_size == reference.transform.min_size
    assert model.transform.max_size == reference.transform.max_size
    generator = model.rpn.anchor_generator if enum.startswith("FasterRCNN") else model.anchor_generator
    ref_generator = reference.rpn.anchor_generator if enum.startswith("FasterRCNN") else reference.anchor_generator
    assert generator.sizes == ref_generator.sizes and generator.aspect_ratios == ref_generator.aspect_ratios
    extra = model.backbone.fpn.extra_blocks
    assert getattr(extra, "use_P5", None) == getattr(reference.backbone.fpn.extra_blocks, "use_P5", None)
    if enum.startswith("RetinaNet"):
        assert model.head.regression_head._loss_type == reference.head.regression_head._loss_type
    frozen = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert all(m.eps == (0.0 if enum in ("RetinaNet_ResNet50_FPN_Weights", "FasterRCNN_ResNet50_FPN_Weights") else 1e-5)
               for m in frozen)
    # torchvision's recipe when starting from weights: the first backbone stages are frozen
    assert any(not p.requires_grad for p in model.backbone.body.parameters())
    assert all(p.requires_grad for p in model.backbone.fpn.parameters())


def test_v2_detectors_compute_what_torchvision_computes(torch_home):
    """v2 models have no FrozenBatchNorm2d, so ours and torchvision's agree to the last bit."""
    for name in ("torchvision:RetinaNet_ResNet50_FPN_V2_Weights.COCO_V1",
                 "torchvision:FasterRCNN_ResNet50_FPN_V2_Weights.COCO_V1"):
        enum = name[len("torchvision:"):].split(".")[0]
        torch.manual_seed(0)
        reference = DETECTORS[enum](weights=None, weights_backbone=None, num_classes=91).eval()
        _stand_in(torch_home, name, reference.state_dict())
        cfg = model_config_for(name).model_copy(update={"min_size": 128, "max_size": 128})
        model = build_detector(cfg).eval()
        reference.transform.min_size, reference.transform.max_size = (128,), 128
        image = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1))]
        with torch.no_grad():
            features = model.backbone(model.transform(image)[0].tensors)
            ref_features = reference.backbone(reference.transform(image)[0].tensors)
        for a, b in zip(features.values(), ref_features.values()):
            assert torch.equal(a, b)


def _legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The key names torchvision's v1 COCO files were published with (before Conv2dNormActivation)."""
    import re

    out = {}
    for key, value in state.items():
        key = re.sub(r"(inner|layer)_blocks\.(\d+)\.0\.", r"\1_blocks.\2.", key)
        key = re.sub(r"rpn\.head\.conv\.0\.0\.", "rpn.head.conv.", key)
        key = re.sub(r"_head\.conv\.(\d+)\.0\.", lambda m: f"_head.conv.{2 * int(m.group(1))}.", key)
        out[key] = value
    return out  # a plain dict: no _metadata versions, as in the published files


@pytest.mark.parametrize("name", [
    "torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1", "torchvision:FasterRCNN_ResNet50_FPN_Weights.COCO_V1",
])
def test_legacy_key_names_of_the_published_v1_files_load(torch_home, name):
    enum = name[len("torchvision:"):].split(".")[0]
    reference = DETECTORS[enum](weights=None, weights_backbone=None, num_classes=91)
    legacy = _legacy_names(reference.state_dict())
    assert set(legacy) != set(reference.state_dict())
    reference.load_state_dict(legacy)  # torchvision's own modules accept (and rename) them
    _stand_in(torch_home, name, legacy)
    _assert_holds(build_detector(model_config_for(name)), reference.state_dict())


def test_categories_are_the_published_names_in_label_order():
    categories = categories_for("torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1")
    assert len(categories) == 90 and categories[:3] == ["person", "bicycle", "car"]
    assert categories[11] == "N/A"  # COCO id 12 is unused: torchvision keeps a placeholder
    assert "__background__" not in categories


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_imagenet_backbone_by_name_fills_the_body_only(torch_home, name):
    enum = name[len("torchvision:"):].split(".")[0]
    classifier, backbone = BACKBONES[enum]
    state = _stand_in(torch_home, name, classifier(weights=None).state_dict())
    mobile = backbone == "mobilenet_v3_large"
    arch = "fasterrcnn" if mobile else "retinanet"
    layout = {"fpn_layout": "torchvision_mobilenet"} if mobile else {}
    cfg = ModelConfig(arch=arch, backbone=backbone, num_classes=3, backbone_weights=name, **layout)
    model = build_detector(cfg)
    _assert_holds(model.backbone.body, state, prefix="features." if mobile else "")
    # torchvision's recipe: frozen BN, and the first stages frozen (3 trainable by default)
    assert cfg.norm == "frozen_bn" and not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())
    frozen = {n.split(".")[0] for n, p in model.backbone.body.named_parameters() if not p.requires_grad}
    assert frozen == ({str(i) for i in range(7)} if mobile else {"conv1", "layer1"})


def test_backbone_weights_leave_fpn_and_heads_fresh(torch_home):
    name = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    _stand_in(torch_home, name, tvm.resnet18(weights=None).state_dict())
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=32, backbone_weights=name)
    torch.manual_seed(0)
    a = build_detector(cfg).state_dict()
    torch.manual_seed(1)
    b = build_detector(cfg).state_dict()
    for key in a:
        from_file = key.startswith("backbone.body.")
        assert torch.equal(a[key], b[key]) == from_file or "bias" in key or "running" in key, key


def test_trainable_layers_and_norm_can_be_changed(torch_home):
    name = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    state = _stand_in(torch_home, name, tvm.resnet18(weights=None).state_dict())
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3, fpn_channels=32,
                      backbone_weights=name, norm="bn", trainable_backbone_layers=5)
    model = build_detector(cfg)
    _assert_holds(model.backbone.body, state)  # BatchNorm takes the step counters too
    assert isinstance(model.backbone.body.bn1, nn.BatchNorm2d)
    assert all(p.requires_grad for p in model.backbone.body.parameters())


def test_missing_file_names_the_file_and_where_and_downloads_nothing(torch_home):
    name = "torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1"
    with pytest.raises(WeightsError) as info:
        build_detector(model_config_for(name))
    (problem,) = info.value.problems
    expected = _cache_file(torch_home, name)
    assert problem.loc == ("weights",) and problem.code == "weights_missing"
    assert expected.name in problem.message and str(expected) in problem.message
    assert not expected.exists()
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3,
                      backbone_weights="torchvision:ResNet18_Weights.IMAGENET1K_V1")
    assert [p.loc for p in weights_problems(cfg, loc=("student",))] == [("student", "backbone_weights")]
    assert weights_problems(cfg, check_files=False) == []


@pytest.mark.parametrize("value,message", [
    ("torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V9", "has no member 'COCO_V9'"),
    ("torchvision:MaskRCNN_ResNet50_FPN_Weights.COCO_V1", "not a supported torchvision detector"),
    ("torchvision:ResNet50_Weights.IMAGENET1K_V2", "not a supported torchvision detector"),  # a backbone
    ("torchvision:RetinaNet_ResNet50_FPN_Weights", "has no member ''"),
])
def test_unknown_names_are_problems_at_the_field(torch_home, value, message):
    cfg = ModelConfig(arch="retinanet", num_classes=90, weights=value)
    (problem,) = weights_problems(cfg)
    assert problem.loc == ("weights",) and problem.code == "unknown_weights" and message in problem.message
    with pytest.raises(WeightsError, match=message):
        load_initial_weights(build_detector(cfg, load_weights=False), cfg)


def test_weights_of_another_backbone_are_refused(torch_home):
    cfg = ModelConfig(arch="retinanet", backbone="resnet18", num_classes=3,
                      backbone_weights="torchvision:ResNet50_Weights.IMAGENET1K_V2")
    (problem,) = weights_problems(cfg)
    assert problem.loc == ("backbone_weights",) and "resnet50 backbone, not resnet18" in problem.message


def test_download_only_when_allowed(torch_home, monkeypatch):
    name = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(WeightsError):
        resolve(name, kind="backbone")
    fetched = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        Path(dst).write_bytes(b"")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    path = resolve(name, kind="backbone", allow_download=True)
    assert path == _cache_file(torch_home, name)
    assert fetched == [(_member(name).url, "f37072fd")]  # torchvision's hash prefix is checked
