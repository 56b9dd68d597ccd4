"""torchvision's published weights by name: ``torchvision:<WeightsEnum>.<member>``.

Two kinds of names are understood:

* **detectors** (``ModelConfig.weights``): torchvision's COCO RetinaNet, FCOS and Faster R-CNN
  weights that the project's builder reproduces exactly. ``model_config_for(name)`` is the
  ``ModelConfig`` that rebuilds the detector (so the file loads strictly), ``categories_for(name)``
  its category names in label order (label L is ``categories[L - 1]``, as for datasets; COCO's
  unused ids are kept as torchvision's ``"N/A"`` placeholders, so 90 names for 91 outputs);
* **backbones** (``ModelConfig.backbone_weights``): torchvision's ImageNet ResNet and
  MobileNetV3-Large classifiers, of which only the body is loaded.

Files resolve through torch's own hub cache, ``$TORCH_HOME/hub/checkpoints/<torchvision's file
name>``: a file placed there by hand (or by torchvision itself) is used as is. Nothing is
downloaded unless a caller passes ``allow_download=True``, and then with torchvision's hash check.
Names are resolved here; ``gid_core.models`` loads the files (``weights_only``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tv_models
import torchvision.models.detection as tv_detection

from .config import ModelConfig
from .errors import Loc, Problem, ProblemsError

PREFIX = "torchvision:"

# Detector weights -> the ModelConfig fields of the torchvision builder they come from
# (num_classes and categories come from the weights' metadata).
_DETECTORS: dict[str, dict[str, Any]] = {
    # retinanet_resnet50_fpn: frozen BN (eps 0 for COCO_V1, torchvision's overwrite_eps), P6 from P5
    "RetinaNet_ResNet50_FPN_Weights": dict(arch="retinanet", backbone="resnet50", norm="frozen_bn"),
    # retinanet_resnet50_fpn_v2: BatchNorm body, GroupNorm head, P6 from C5
    "RetinaNet_ResNet50_FPN_V2_Weights": dict(arch="retinanet", backbone="resnet50", norm="bn", variant="v2"),
    "FCOS_ResNet50_FPN_Weights": dict(arch="fcos", backbone="resnet50", norm="frozen_bn"),
    "FasterRCNN_ResNet50_FPN_Weights": dict(arch="fasterrcnn", backbone="resnet50", norm="frozen_bn"),
    "FasterRCNN_ResNet50_FPN_V2_Weights": dict(arch="fasterrcnn", backbone="resnet50", norm="bn", variant="v2"),
    "FasterRCNN_MobileNet_V3_Large_FPN_Weights": dict(
        arch="fasterrcnn", backbone="mobilenet_v3_large", norm="frozen_bn", fpn_layout="torchvision_mobilenet",
    ),
    "FasterRCNN_MobileNet_V3_Large_320_FPN_Weights": dict(
        arch="fasterrcnn", backbone="mobilenet_v3_large", norm="frozen_bn", fpn_layout="torchvision_mobilenet",
        min_size=320, max_size=640,
    ),
}
# torchvision's builders set FrozenBatchNorm2d eps to 0 for these (their weights were trained so)
_ZERO_EPS = {("RetinaNet_ResNet50_FPN_Weights", "COCO_V1"), ("FasterRCNN_ResNet50_FPN_Weights", "COCO_V1")}
# torchvision's builders leave the top 3 backbone stages trainable when starting from weights
TRAINABLE_LAYERS_PRETRAINED = 3

# ImageNet classifiers -> the ModelConfig.backbone they fit
_BACKBONES: dict[str, str] = {
    "ResNet18_Weights": "resnet18",
    "ResNet34_Weights": "resnet34",
    "ResNet50_Weights": "resnet50",
    "ResNet101_Weights": "resnet101",
    "MobileNet_V3_Large_Weights": "mobilenet_v3_large",
}

# torch.hub's rule: the file name carries the first hex digits of the file's sha256
_HASH_PREFIX = re.compile(r"-([a-f0-9]*)\.")


@dataclass(frozen=True)
class TorchvisionWeights:
    """One published weights file of torchvision."""

    name: str  # canonical "torchvision:<Enum>.<member>"
    kind: str  # "detector" or "backbone"
    backbone: str  # the ModelConfig.backbone it fits
    url: str
    categories: tuple[str, ...]  # label order (detectors: background dropped; backbones: ImageNet classes)
    enum_member: Any  # the torchvision WeightsEnum member

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str:
        match = _HASH_PREFIX.search(self.file_name)
        return match.group(1) if match else ""


class WeightsError(ProblemsError):
    """A weights name that is unknown, of the wrong kind, or whose file is not in the cache. Each
    problem's loc is a field of the ``ModelConfig`` (``("weights",)`` or ``("backbone_weights",)``)."""

    summary = "weights unavailable"


def is_weights_name(value: str | None) -> bool:
    return value is not None and value.startswith(PREFIX)


def weights_names(kind: str | None = None) -> list[str]:
    """Every supported name (of one kind: "detector" or "backbone"), canonical spelling."""
    tables = {"detector": (tv_detection, _DETECTORS), "backbone": (tv_models, _BACKBONES)}
    names = []
    for k, (module, table) in tables.items():
        if kind in (None, k):
            names += [f"{PREFIX}{enum}.{m.name}" for enum in table for m in getattr(module, enum)]
    return names


def lookup(name: str, *, kind: str, loc: Loc = ("weights",)) -> TorchvisionWeights:
    """The published weights ``name`` stands for; ``WeightsError`` at ``loc`` if it names none of
    the supported ``kind`` ("detector" or "backbone")."""
    module, table = (tv_detection, _DETECTORS) if kind == "detector" else (tv_models, _BACKBONES)
    enum_name, _, member_name = name[len(PREFIX):].partition(".") if is_weights_name(name) else ("", "", "")
    if enum_name not in table:
        supported = ", ".join(table)
        raise WeightsError([Problem(
            loc, f"{name!r} is not a supported torchvision {kind} weights name: expected "
            f"'{PREFIX}<WeightsEnum>.<member>' with WeightsEnum one of {supported}", "unknown_weights",
        )])
    enum = getattr(module, enum_name)
    try:
        member = enum[member_name]
    except KeyError:
        members = ", ".join(m.name for m in enum)
        raise WeightsError([Problem(
            loc, f"{enum_name} has no member {member_name!r}: one of {members}", "unknown_weights"
        )]) from None
    categories = list(member.meta["categories"])
    if kind == "detector":
        categories = categories[1:]  # torchvision's index 0 is "__background__"
        backbone = table[enum_name]["backbone"]
    else:
        backbone = table[enum_name]
    return TorchvisionWeights(
        name=f"{PREFIX}{enum_name}.{member.name}", kind=kind, backbone=backbone, url=member.url,
        categories=tuple(categories), enum_member=member,
    )


def model_config_for(name: str) -> ModelConfig:
    """The config that rebuilds the detector the weights ``name`` belong to, with ``weights=name``:
    ``build_detector`` of it loads the published file strictly."""
    spec = lookup(name, kind="detector")
    enum_name, member = spec.name[len(PREFIX):].split(".")
    fields = dict(_DETECTORS[enum_name])
    if (enum_name, member) in _ZERO_EPS:
        fields["frozen_bn_eps"] = 0.0
    return ModelConfig(
        **fields,
        num_classes=len(spec.categories),  # + 1 background/unused slot = the published 91 outputs
        trainable_backbone_layers=TRAINABLE_LAYERS_PRETRAINED,
        weights=spec.name,
    )


def categories_for(name: str) -> list[str]:
    """Category names of a detector's weights in label order (label L is ``categories[L - 1]``),
    COCO's unused ids included as torchvision's ``"N/A"``."""
    return list(lookup(name, kind="detector").categories)


def cache_dir() -> Path:
    """torch's hub checkpoint cache: ``$TORCH_HOME/hub/checkpoints`` (read at each call)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def weights_file(spec: TorchvisionWeights) -> Path:
    return cache_dir() / spec.file_name


def resolve(name: str, *, kind: str, loc: Loc = ("weights",), allow_download: bool = False) -> Path:
    """The cached file of the weights ``name``. A missing file raises ``WeightsError`` naming the
    file to place and where, unless ``allow_download`` (torchvision's URL, hash-checked)."""
    spec = lookup(name, kind=kind, loc=loc)
    path = weights_file(spec)
    if path.is_file():
        return path
    if not allow_download:
        raise WeightsError([Problem(
            loc, f"{spec.name}: weights file {spec.file_name} is not in the cache: place it at {path} "
            f"(torchvision's file from {spec.url})", "weights_missing",
        )])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(spec.url, str(path), hash_prefix=spec.hash_prefix or None)
    return path


def weights_problems(cfg: ModelConfig, *, loc: Loc = (), check_files: bool = True) -> list[Problem]:
    """What is wrong with the torchvision names of ``cfg`` (unknown, of another backbone, file not
    cached), located at ``loc + ("weights",)`` / ``loc + ("backbone_weights",)``; local paths are
    left to the loader."""
    problems: list[Problem] = []
    for field, kind in (("weights", "detector"), ("backbone_weights", "backbone")):
        name = getattr(cfg, field)
        if not is_weights_name(name):
            continue
        try:
            spec = lookup(name, kind=kind, loc=(*loc, field))
            if spec.backbone != cfg.backbone:
                problems.append(Problem(
                    (*loc, field), f"{spec.name} is for a {spec.backbone} backbone, not {cfg.backbone}",
                    "weights_mismatch",
                ))
            elif check_files:
                resolve(name, kind=kind, loc=(*loc, field))
        except WeightsError as e:
            problems += e.problems
    return problems
