"""Detector builders: every arch x backbone builds a plain torchvision detector, loads weights safely."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from gid_core.config import ModelConfig
from gid_core.models import build_detector, load_initial_weights, load_state_dict_file, save_state_dict_file

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


# --------------------------------------------------------------------------- variants, init modes


@pytest.mark.parametrize("arch", ["retinanet", "fasterrcnn"])
def test_v2_variant_matches_the_torchvision_v2_builder(arch):
    stock = {"retinanet": torchvision.models.detection.retinanet_resnet50_fpn_v2,
             "fasterrcnn": torchvision.models.detection.fasterrcnn_resnet50_fpn_v2}[arch]
    ours = build_detector(ModelConfig(arch=arch, num_classes=3, variant="v2"), load_weights=False)
    reference = stock(weights=None, weights_backbone=None, num_classes=4)
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert str(ours) == str(reference)  # same modules, same hyper-parameters, layer by layer


def test_v2_retinanet_takes_p6_from_c5_even_when_widths_match():
    # resnet18's C5 has 512 channels: with a 512-wide FPN torchvision would infer "from P5"
    model = build_detector(_cfg("retinanet", variant="v2").model_copy(update={"fpn_channels": 512}))
    assert model.backbone.fpn.extra_blocks.use_P5 is False
    assert build_detector(_cfg("retinanet")).backbone.fpn.extra_blocks.use_P5 is True


def test_torchvision_mobilenet_layout_matches_its_builder():
    cfg = ModelConfig(
        arch="fasterrcnn", backbone="mobilenet_v3_large", num_classes=3, fpn_layout="torchvision_mobilenet"
    )
    ours = build_detector(cfg)
    stock = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn
    reference = stock(weights=None, weights_backbone=None, num_classes=4)
    reference.load_state_dict(ours.state_dict(), strict=True)
    assert ours.rpn.anchor_generator.sizes == reference.rpn.anchor_generator.sizes


R50_IMAGENET = "torchvision:ResNet50_Weights.IMAGENET1K_V2"


@pytest.mark.parametrize("fields,field", [
    ({"arch": "fcos", "fpn_channels": 64, "variant": "v2"}, "variant"),
    ({"arch": "retinanet", "fpn_channels": 48, "variant": "v2"}, "variant"),
    ({"arch": "retinanet", "backbone": "mobilenet_v3_large", "fpn_layout": "torchvision_mobilenet"}, "fpn_layout"),
    ({"arch": "fasterrcnn", "backbone": "resnet50", "fpn_layout": "torchvision_mobilenet"}, "fpn_layout"),
    ({"arch": "retinanet", "weights": "a.pt", "backbone_weights": R50_IMAGENET}, "backbone_weights"),
    ({"arch": "retinanet", "backbone_weights": R50_IMAGENET, "norm": "gn"}, "backbone_weights"),
    ({"arch": "retinanet", "backbone_weights": "/etc/some/file.pt"}, "backbone_weights"),  # names only
    ({"arch": "retinanet", "trainable_backbone_layers": 6}, "trainable_backbone_layers"),
    ({"arch": "retinanet", "init_mode": "backbone_and_box"}, "init_mode"),
])
def test_config_refuses_combinations_torchvision_has_no_recipe_for(fields, field):
    with pytest.raises(ValueError) as info:
        ModelConfig(num_classes=3, **fields)
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_pretrained_backbone_defaults_to_frozen_bn_unless_norm_is_given():
    assert ModelConfig(arch="retinanet", num_classes=3, backbone_weights=R50_IMAGENET).norm == "frozen_bn"
    assert ModelConfig(arch="retinanet", num_classes=3, backbone_weights=R50_IMAGENET, norm="bn").norm == "bn"
    assert ModelConfig(arch="retinanet", num_classes=3).norm == "bn"


@pytest.mark.parametrize("arch", ["retinanet", "fcos", "fasterrcnn"])
def test_new_head_on_a_trained_body(tmp_path, arch):
    torch.manual_seed(0)
    trained = build_detector(_cfg(arch).model_copy(update={"num_classes": 5}))
    path = tmp_path / "trained.safetensors"
    save_state_dict_file(trained.state_dict(), path)
    cfg = _cfg(arch, weights=str(path), init_mode="backbone_and_box")
    torch.manual_seed(1)
    model = build_detector(cfg, load_weights=False)
    report = load_initial_weights(model, cfg)
    own, file = model.state_dict(), trained.state_dict()
    cls_prefix = "roi_heads.box_predictor.cls_score." if arch == "fasterrcnn" else "head.classification_head."
    for key in own:
        if key.startswith("backbone.") or (key in report.loaded):
            assert torch.equal(own[key], file[key]), key
    assert not set(report.loaded) & set(report.fresh)
    assert not any(k.startswith("backbone.") for k in report.fresh)
    assert any(k.startswith(cls_prefix) for k in report.fresh)
    assert not any(k.startswith(cls_prefix) for k in report.loaded)
    box_branch = "roi_heads.box_head." if arch == "fasterrcnn" else "head.regression_head."
    assert any(k.startswith(box_branch) for k in report.loaded)
    if arch == "fasterrcnn":  # class-specific box deltas cannot carry over to 3 classes
        assert "roi_heads.box_predictor.bbox_pred.weight" in report.fresh
        assert any(k.startswith("rpn.") for k in report.loaded)
    # without the flag the same file is refused: never a silent partial load
    with pytest.raises(ValueError, match="shape mismatch"):
        build_detector(_cfg(arch, weights=str(path)))


def test_new_head_needs_the_same_backbone(tmp_path):
    path = tmp_path / "r34.safetensors"
    save_state_dict_file(build_detector(_cfg("retinanet", "resnet34")).state_dict(), path)
    with pytest.raises(ValueError, match="does not share this detector's backbone"):
        build_detector(_cfg("retinanet", "resnet50", weights=str(path), init_mode="backbone_and_box"))
