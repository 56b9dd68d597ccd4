"""Detector builders: one registry from a :class:`ModelConfig` to a plain torchvision detector.

Every model built here is an unmodified ``torchvision.models.detection`` class (``RetinaNet``,
``FCOS``, ``FasterRCNN``) on a torchvision ``BackboneWithFPN``; only the arguments differ. So a
state_dict trained here loads into the same constructor call on any machine with torchvision, and a
ResNet-50 / 256-channel / ``bn`` / default-anchor model loads into the stock builders
(``retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=C + 1)`` and friends).

Nothing is ever downloaded: backbones start from random initialisation unless ``cfg.weights``
names a local file, which is read with ``weights_only=True`` (or as safetensors).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import misc as misc_nn_ops
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from .config import ModelConfig
from .fileio import atomic_write_bytes

# Base anchor size of each FPN level when the config gives none: torchvision's defaults.
DEFAULT_ANCHOR_SIZES: dict[str, list[int]] = {
    "retinanet": [32, 64, 128, 256, 512],  # P3..P7
    "fcos": [8, 16, 32, 64, 128],  # P3..P7: one point per location, size = stride
    "fasterrcnn": [32, 64, 128, 256, 512],  # P2..P6 (RPN)
}
NUM_LEVELS = 5

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


def _resnet_fpn(cfg: ModelConfig, returned_layers: list[int], extra_blocks: nn.Module) -> BackboneWithFPN:
    body = _RESNETS[cfg.backbone](weights=None, norm_layer=norm_layer_for(cfg.norm))
    in_channels_stage2 = body.inplanes // 8  # 64 for BasicBlock nets, 256 for Bottleneck nets
    in_channels_list = [in_channels_stage2 * 2 ** (i - 1) for i in returned_layers]
    return_layers = {f"layer{k}": str(v) for v, k in enumerate(returned_layers)}
    return BackboneWithFPN(body, return_layers, in_channels_list, cfg.fpn_channels, extra_blocks=extra_blocks)


def _mobilenet_fpn(cfg: ModelConfig, num_returned: int, extra_blocks: nn.Module) -> BackboneWithFPN:
    features = mobilenet_v3_large(weights=None, norm_layer=norm_layer_for(cfg.norm)).features
    # Stage boundaries as torchvision's _mobilenet_extractor finds them: the blocks that start
    # strides 4, 8, 16, 32, then the last conv (stride 32 again). Take the last `num_returned`
    # distinct strides so the levels line up with a ResNet FPN's (P3-P5, or P2-P5).
    stage_indices = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    returned = list(range(len(stage_indices) - 1 - num_returned, len(stage_indices) - 1))
    return_layers = {f"{stage_indices[k]}": str(v) for v, k in enumerate(returned)}
    in_channels_list = [features[stage_indices[i]].out_channels for i in returned]
    return BackboneWithFPN(features, return_layers, in_channels_list, cfg.fpn_channels, extra_blocks=extra_blocks)


def build_backbone(cfg: ModelConfig) -> BackboneWithFPN:
    """FPN backbone with the levels each detector expects: P3-P7 (RetinaNet, FCOS), P2-P6 (Faster R-CNN)."""
    f = cfg.fpn_channels
    if cfg.arch in ("retinanet", "fcos"):
        extra = LastLevelP6P7(f, f)  # P6 from P5, as torchvision's v1 RetinaNet and FCOS do
        if cfg.backbone == "mobilenet_v3_large":
            return _mobilenet_fpn(cfg, 3, extra)
        return _resnet_fpn(cfg, [2, 3, 4], extra)
    if cfg.backbone == "mobilenet_v3_large":
        return _mobilenet_fpn(cfg, 4, LastLevelMaxPool())
    return _resnet_fpn(cfg, [1, 2, 3, 4], LastLevelMaxPool())


def anchor_sizes_for(cfg: ModelConfig) -> list[int]:
    sizes = cfg.anchor_sizes or DEFAULT_ANCHOR_SIZES[cfg.arch]
    if len(sizes) != NUM_LEVELS:
        raise ValueError(f"anchor_sizes: {cfg.arch} has {NUM_LEVELS} FPN levels, got {len(sizes)} sizes")
    return list(sizes)


def build_anchor_generator(cfg: ModelConfig) -> AnchorGenerator:
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
    if cfg.arch == "retinanet":
        head = None
        if cfg.norm == "gn":
            # GroupNorm in the head (torchvision's RetinaNet v2 recipe): trains from scratch at small batch.
            head = RetinaNetHead(backbone.out_channels, 9, num_classes, norm_layer=head_group_norm)
        model: nn.Module = RetinaNet(backbone, num_classes, head=head, **common)
    elif cfg.arch == "fcos":
        model = FCOS(backbone, num_classes, **common)
    elif cfg.arch == "fasterrcnn":
        model = FasterRCNN(backbone, num_classes, rpn_anchor_generator=common.pop("anchor_generator"), **common)
    else:  # pragma: no cover - pydantic rejects unknown archs first
        raise ValueError(f"unknown arch {cfg.arch!r}")
    if load_weights and cfg.weights:
        state = load_state_dict_file(cfg.weights)
        load_state_dict_checked(model, state, source=cfg.weights)
    return model


def load_state_dict_checked(model: nn.Module, state: dict[str, Tensor], *, source: str = "state_dict") -> None:
    """Strict load with one readable error listing missing, unexpected and mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mis_shaped = [
        f"{k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    # FrozenBatchNorm2d drops num_batches_tracked itself: don't report those as unexpected.
    unexpected = [k for k in unexpected if not k.endswith("num_batches_tracked")]
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
    obj = torch.load(path, map_location="cpu", weights_only=True)
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
