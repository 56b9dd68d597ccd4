"""Detector builders: one registry from a :class:`ModelConfig` to a plain torchvision detector.

Every model built here is an unmodified ``torchvision.models.detection`` class (``RetinaNet``,
``FCOS``, ``FasterRCNN``) on a torchvision ``BackboneWithFPN``; only the arguments differ. So a
state_dict trained here loads into the same constructor call on any machine with torchvision, and a
ResNet-50 / 256-channel / ``bn`` / default-anchor model loads into the stock builders
(``retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=C + 1)`` and friends).

``variant="v2"`` and ``fpn_layout="torchvision_mobilenet"`` reproduce torchvision's other COCO
builders exactly, so their published weights load strictly (``gid_core.weights``).

Nothing is downloaded here: a model starts from random initialisation unless ``cfg.weights`` (a
whole detector: a local file, or a torchvision weights name) or ``cfg.backbone_weights`` (an
ImageNet body, by torchvision name) says otherwise; names resolve in torch's hub cache, and files
are read with ``weights_only=True`` (or as safetensors).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .config import FPN_LEVELS, ModelConfig
from .fileio import atomic_write_bytes
from .weights import TRAINABLE_LAYERS_PRETRAINED, WeightsError, is_weights_name, resolve, weights_problems

logger = logging.getLogger(__name__)

# Base anchor size of each FPN level when the config gives none: torchvision's defaults.
DEFAULT_ANCHOR_SIZES: dict[str, list[int]] = {
    "retinanet": [32, 64, 128, 256, 512],  # P3..P7
    "fcos": [8, 16, 32, 64, 128],  # P3..P7: one point per location, size = stride
    "fasterrcnn": [32, 64, 128, 256, 512],  # P2..P6 (RPN)
}
NUM_LEVELS = FPN_LEVELS  # ModelConfig refuses anchor_sizes of another length

_RESNETS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}


def group_norm(num_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, fewer where the channel count demands it (MobileNet's 16, 24...)."""
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels)


def head_group_norm(num_channels: int) -> nn.GroupNorm:
    """Head GroupNorm keeping >= 2 channels per group: P7 of a small image is 1x1, and a group of
    one channel at 1x1 has a single value to normalise."""
    return nn.GroupNorm(math.gcd(32, max(1, num_channels // 2)), num_channels)


def norm_layer_for(norm: str) -> Callable[[int], nn.Module]:
    if norm == "bn":
        return nn.BatchNorm2d
    if norm == "frozen_bn":
        return misc_nn_ops.FrozenBatchNorm2d
    if norm == "gn":
        return group_norm
    raise ValueError(f"unknown norm {norm!r}")


ExtraBlocks = Callable[[int], nn.Module]  # C5 channels -> the FPN's extra levels


def trainable_layers_for(cfg: ModelConfig) -> int | None:
    """Backbone stages left trainable (None: all): torchvision's recipe freezes the first stages of
    a pretrained backbone."""
    if cfg.trainable_backbone_layers is not None:
        return cfg.trainable_backbone_layers
    return TRAINABLE_LAYERS_PRETRAINED if cfg.backbone_weights else None


def _resnet_fpn(cfg: ModelConfig, returned_layers: list[int], extra_blocks: ExtraBlocks) -> BackboneWithFPN:
    body = _RESNETS[cfg.backbone](weights=None, norm_layer=norm_layer_for(cfg.norm))
    trainable = trainable_layers_for(cfg)
    if trainable is not None:  # torchvision's _resnet_fpn_extractor rule
        layers_to_train = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable]
        layers_to_train += ["bn1"] if trainable == 5 else []
        for name, parameter in body.named_parameters():
            if not name.startswith(tuple(layers_to_train)):
                parameter.requires_grad_(False)
    in_channels_stage2 = body.inplanes // 8  # 64 for BasicBlock nets, 256 for Bottleneck nets
    in_channels_list = [in_channels_stage2 * 2 ** (i - 1) for i in returned_layers]
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    return BackboneWithFPN(
        body, return_layers, in_channels_list, cfg.fpn_channels,
        extra_blocks=extra_blocks(in_channels_stage2 * 8), norm_layer=_fpn_norm(cfg),
    )


def _mobilenet_fpn(cfg: ModelConfig, num_returned: int, extra_blocks: ExtraBlocks) -> BackboneWithFPN:
    features = mobilenet_v3_large(weights=None, norm_layer=norm_layer_for(cfg.norm)).features
    # Stage boundaries as torchvision's _mobilenet_extractor finds them: the blocks that start
    # strides 4, 8, 16, 32, then the last conv (stride 32 again). The aligned layout takes the last
    # `num_returned` distinct strides so the levels line up with a ResNet FPN's (P3-P5, or P2-P5);
    # torchvision's own takes the last two stages (both stride 32).
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    num_stages = len(stage_indices)
    trainable = trainable_layers_for(cfg)
    if trainable is not None:  # torchvision's _mobilenet_extractor rule
        freeze_before = len(features) if trainable == 0 else stage_indices[num_stages - trainable]
        for parameter in features[:freeze_before].parameters():
            parameter.requires_grad_(False)
    last = num_stages if cfg.fpn_layout == "torchvision_mobilenet" else num_stages - 1
    returned = list(range(last - num_returned, last))
    return_layers = {f"{stage_indices[k]}": str(v) for v, k in enumerate(returned)}
    in_channels_list = [features[stage_indices[i]].out_channels for i in returned]
    return BackboneWithFPN(
        features, return_layers, in_channels_list, cfg.fpn_channels,
        extra_blocks=extra_blocks(in_channels_list[-1]), norm_layer=_fpn_norm(cfg),
    )


def _fpn_norm(cfg: ModelConfig) -> Callable[[int], nn.Module] | None:
    # fasterrcnn_resnet50_fpn_v2 puts BatchNorm in the FPN convs
    return nn.BatchNorm2d if cfg.arch == "fasterrcnn" and cfg.variant == "v2" else None


def _p6p7(cfg: ModelConfig, c5_channels: int) -> LastLevelP6P7:
    """P6/P7 from P5 (v1: torchvision's retinanet/fcos_resnet50_fpn) or from C5 (v2)."""
    f = cfg.fpn_channels
    extra = LastLevelP6P7(c5_channels if cfg.variant == "v2" else f, f)
    extra.use_P5 = cfg.variant != "v2"  # set explicitly: torchvision infers it from equal channel counts
    return extra


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """FPN backbone with the levels each detector expects: P3-P7 (RetinaNet, FCOS), P2-P6 (Faster
    R-CNN), or torchvision's MobileNet layout (two stride-32 maps + pool)."""
    if cfg.arch in ("retinanet", "fcos"):
        extra = partial(_p6p7, cfg)
        if cfg.backbone == "mobilenet_v3_large":
            return _mobilenet_fpn(cfg, 3, extra)
        return _resnet_fpn(cfg, [2, 3, 4], extra)
    if cfg.backbone == "mobilenet_v3_large":
        num_returned = 2 if cfg.fpn_layout == "torchvision_mobilenet" else 4
        return _mobilenet_fpn(cfg, num_returned, lambda _: LastLevelMaxPool())
    return _resnet_fpn(cfg, [1, 2, 3, 4], lambda _: LastLevelMaxPool())


def anchor_sizes_for(cfg: ModelConfig) -> list[int]:
    sizes = cfg.anchor_sizes or DEFAULT_ANCHOR_SIZES[cfg.arch]
    if len(sizes) != NUM_LEVELS:
        raise ValueError(f"anchor_sizes: {cfg.arch} has {NUM_LEVELS} FPN levels, got {len(sizes)} sizes")
    return list(sizes)


def build_anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
    if cfg.fpn_layout == "torchvision_mobilenet":
        # fasterrcnn_mobilenet_v3_large_fpn: all five sizes on each of its three maps
        return AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
    sizes = anchor_sizes_for(cfg)
    if cfg.arch == "retinanet":
        # Three scales per octave, as torchvision's _default_anchorgen.
        per_level = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in sizes)
        return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * NUM_LEVELS)
    if cfg.arch == "fcos":
        return AnchorGenerator(tuple((x,) for x in sizes), ((1.0,),) * NUM_LEVELS)
    return AnchorGenerator(tuple((x,) for x in sizes), ((0.5, 1.0, 2.0),) * NUM_LEVELS)


def build_detector(cfg: ModelConfig, *, load_weights: bool = True) -> nn.Module:
    """Build the torchvision detector ``cfg`` describes (and load ``cfg.weights`` if set)."""
    backbone = build_backbone(cfg)
    num_classes = cfg.num_classes + 1  # labels are 1..C; index 0 is background / unused
    common = dict(min_size=cfg.min_size, max_size=cfg.max_size, anchor_generator=build_anchor_generator(cfg))
    out = backbone.out_channels
    if cfg.arch == "retinanet":
        head = None
        if cfg.variant == "v2":  # retinanet_resnet50_fpn_v2
            head = RetinaNetHead(out, 9, num_classes, norm_layer=partial(nn.GroupNorm, 32))
            head.regression_head._loss_type = "giou"
        elif cfg.norm == "gn":
            # GroupNorm in the head (as in torchvision's RetinaNet v2): trains from scratch at small batch.
            head = RetinaNetHead(out, 9, num_classes, norm_layer=head_group_norm)
        model: nn.Module = RetinaNet(backbone, num_classes, head=head, **common)
    elif cfg.arch == "fcos":
        model = FCOS(backbone, num_classes, **common)
    elif cfg.arch == "fasterrcnn":
        anchors = common.pop("anchor_generator")
        heads = {}
        if cfg.variant == "v2":  # fasterrcnn_resnet50_fpn_v2
            heads = dict(
                rpn_head=RPNHead(out, anchors.num_anchors_per_location()[0], conv_depth=2),
                box_head=FastRCNNConvFCHead((out, 7, 7), [256, 256, 256, 256], [1024], norm_layer=nn.BatchNorm2d),
            )
        model = FasterRCNN(backbone, num_classes, rpn_anchor_generator=anchors, **heads, **common)
    else:  # pragma: no cover - pydantic rejects unknown archs first
        raise ValueError(f"unknown arch {cfg.arch!r}")
    for module in model.modules():
        if isinstance(module, misc_nn_ops.FrozenBatchNorm2d):
            module.eps = cfg.frozen_bn_eps  # torchvision's overwrite_eps
    if load_weights:
        load_initial_weights(model, cfg)
    return model


# --------------------------------------------------------------------------- initial weights


@dataclass
class LoadReport:
    """What ``load_compatible`` took from a state_dict."""

    loaded: list[str]  # model keys now holding the file's tensors
    fresh: list[str]  # model keys left at their initialisation
    unused: list[str]  # file keys not loaded


def _weights_path(value: str, *, kind: str, field: str) -> Path:
    return resolve(value, kind=kind, loc=(field,)) if is_weights_name(value) else Path(value)


def load_initial_weights(model: nn.Module, cfg: ModelConfig) -> LoadReport | None:
    """Load ``cfg.backbone_weights`` into the body or ``cfg.weights`` into the detector (strictly,
    or per ``cfg.init_mode``). Torchvision names must fit the config and be in the cache
    (``WeightsError``, located at the ``ModelConfig`` field)."""
    problems = weights_problems(cfg)
    if problems:
        raise WeightsError(problems)
    if cfg.backbone_weights:
        state = load_state_dict_file(_weights_path(cfg.backbone_weights, kind="backbone", field="backbone_weights"))
        load_backbone_state(model.backbone.body, state, backbone=cfg.backbone, source=cfg.backbone_weights)
    if not cfg.weights:
        return None
    state = load_state_dict_file(_weights_path(cfg.weights, kind="detector", field="weights"))
    if cfg.init_mode == "strict":
        load_state_dict_checked(model, state, source=cfg.weights)
        return None
    report = load_compatible(model, state, source=cfg.weights)
    logger.info(
        "%s: loaded %d tensors; fresh: %s; unused: %s", cfg.weights, len(report.loaded),
        _summary(report.fresh), _summary(report.unused),
    )
    return report


def _summary(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" ... ({len(keys)})" if len(keys) > limit else "") if keys else "none"


def load_backbone_state(body: nn.Module, state: dict[str, Tensor], *, backbone: str, source: str) -> None:
    """An ImageNet classifier's state_dict into an FPN backbone's body: every body tensor must come
    from the file; the classifier's head (``fc``, ``classifier``) and blocks after the FPN's last
    returned stage are not part of the body and are ignored."""
    if backbone == "mobilenet_v3_large":  # the body is the classifier's ``features``
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    own = body.state_dict()
    load_state_dict_checked(body, {k: v for k, v in state.items() if k in own}, source=source)


def classification_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The state_dict prefixes of a detector's classification head (what depends on the classes)."""
    if isinstance(model, (RetinaNet, FCOS)):
        return ("head.classification_head.",)
    if isinstance(model, FasterRCNN):
        return ("roi_heads.box_predictor.cls_score.",)
    raise TypeError(f"no classification head known for {type(model).__name__}")


def load_compatible(model: nn.Module, state: dict[str, Tensor], *, source: str = "state_dict") -> LoadReport:
    """Initialise from a detector of the same architecture with (possibly) another class count:
    backbone and FPN must load completely; the box branch loads where names and shapes fit (Faster
    R-CNN's class-specific ``bbox_pred`` does not across class counts); the classification head
    always starts fresh."""
    own = model.state_dict()
    state = upgrade_legacy_keys(state, own)
    fresh_prefixes = classification_prefixes(model)
    take = {
        k: v for k, v in state.items()
        if k in own and tuple(v.shape) == tuple(own[k].shape) and not k.startswith(fresh_prefixes)
    }
    body_missing = [
        k for k in own if k.startswith("backbone.") and k not in take and not k.endswith("num_batches_tracked")
    ]
    if body_missing:
        raise ValueError(
            f"{source} does not share this detector's backbone and FPN: {_summary(body_missing)} do not fit"
        )
    model.load_state_dict(take, strict=False)
    return LoadReport(
        loaded=list(take), fresh=[k for k in own if k not in take], unused=[k for k in state if k not in take]
    )


# torchvision renamed layers when it moved to Conv2dNormActivation; its modules rename legacy keys
# on load (``_version`` < 2), and the published v1 COCO files carry them. Same renames, up front,
# so the key checks see the current names.
_LEGACY_RENAMES = (
    (re.compile(r"^(.*\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),  # FeaturePyramidNetwork
    (re.compile(r"^(.*rpn\.head\.conv)\.(weight|bias)$"), r"\1.0.0.\2"),  # RPNHead
)
_LEGACY_RETINANET_HEAD = re.compile(r"^(.*_head\.conv)\.(\d+)\.(weight|bias)$")  # conv.{2i} -> conv.{i}.0


def upgrade_legacy_keys(state: dict[str, Tensor], own: Iterable[str]) -> dict[str, Tensor]:
    """``state`` with torchvision's legacy key names renamed to the model's current ones; a key is
    renamed only when the model lacks it and has the new name."""
    own = set(own)
    out = {}
    for key, value in state.items():
        new = key
        if key not in own:
            for pattern, replacement in _LEGACY_RENAMES:
                new = pattern.sub(replacement, new)
            if (m := _LEGACY_RETINANET_HEAD.match(key)) and int(m.group(2)) % 2 == 0:
                new = f"{m.group(1)}.{int(m.group(2)) // 2}.0.{m.group(3)}"
            if new not in own:
                new = key
        out[new] = value
    return out


Shapes = dict[str, tuple[int, ...]]


def state_dict_shapes(cfg: ModelConfig) -> Shapes:
    """The state_dict keys and shapes of ``cfg``'s detector, built on the meta device: no memory is
    allocated for parameters, however large the config (a 10 000-class, 1024-channel RetinaNet has
    a billion)."""
    with torch.device("meta"):
        model = build_detector(cfg, load_weights=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_state_dict_shapes(path: str | os.PathLike) -> Shapes:
    """The keys and shapes of a state_dict file without reading its tensor data: a safetensors
    header, or a torch zip file memory-mapped (``weights_only``, never unpickling code)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return {k: tuple(v.shape) for k, v in _load_torch_state(path, mmap=True).items()}


def state_dict_mismatch(own: Shapes, given: Shapes) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, mis_shaped)`` keys of a ``given`` state_dict against a model's ``own``."""
    missing = [k for k in own if k not in given]
    # FrozenBatchNorm2d drops num_batches_tracked itself: don't report those as unexpected.
    unexpected = [k for k in given if k not in own and not k.endswith("num_batches_tracked")]
    mis_shaped = [k for k in own if k in given and tuple(given[k]) != tuple(own[k])]
    return missing, unexpected, mis_shaped


def load_state_dict_checked(model: nn.Module, state: dict[str, Tensor], *, source: str = "state_dict") -> None:
    """Strict load with one readable error listing missing, unexpected and mis-shaped keys."""
    state = upgrade_legacy_keys(state, model.state_dict())
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    given = {k: tuple(v.shape) for k, v in state.items()}
    missing, unexpected, mis_shaped = state_dict_mismatch(own, given)
    mis_shaped = [f"{k}: {given[k]} vs model {own[k]}" for k in mis_shaped]
    if missing or unexpected or mis_shaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mis_shaped)):
            if keys:
                parts.append(f"{label} ({len(keys)}): " + ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else ""))
        raise ValueError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)  # keys checked above; tolerates num_batches_tracked


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state_dict without unpickling code: safetensors, or torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return _load_torch_state(path)


def _load_torch_state(path: Path, *, mmap: bool = False) -> dict[str, Tensor]:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a training checkpoint: take the model part
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return obj


def save_state_dict_file(state: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a state_dict as safetensors atomically (temp file, fsync, rename)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=metadata))
