"""Instance features: ROIAlign of GI boxes on the FPN level chosen by box scale.

Same level rule as torchvision's ``MultiScaleRoIAlign`` (FPN paper, eq. 1):
``level = floor(k0 + log2(sqrt(w * h) / s0))`` clamped to the pyramid, with the level of each map
inferred from its stride. Unlike ``MultiScaleRoIAlign`` (which hard-codes ``aligned=False``), the
pooling uses ``aligned=True`` (half-pixel correct sampling), as the GID recipe asks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import roi_align


def feature_levels(features: list[Tensor], padded_hw: tuple[int, int]) -> list[int]:
    """FPN level k of each map (stride 2**k), inferred from its size against the padded batch."""
    levels = []
    for f in features:
        scale = f.shape[-2] / padded_hw[0]
        levels.append(int(round(-math.log2(scale))))
    return levels


def assign_levels(boxes: Tensor, levels: list[int], *, canonical_scale: float, canonical_level: int) -> Tensor:
    """Index into ``levels`` (0..L-1) for each (K, 4) box, computed in float32: in float16,
    ``w * h`` overflows above 256 px and large boxes would all go to the top level."""
    boxes = boxes.float()
    side = torch.sqrt((boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0))
    k = torch.floor(canonical_level + torch.log2(side / canonical_scale + 1e-8))
    k = k.clamp(min=min(levels), max=max(levels))
    return (k - min(levels)).to(torch.int64)


def pool_instances(
    features: list[Tensor],
    rois: Tensor,
    level_index: Tensor,
    strides: list[int],
    *,
    output_size: int,
    sampling_ratio: int,
) -> Tensor:
    """ROIAlign (K, 5) rois [batch_idx, x1, y1, x2, y2] on their level -> (K, C, s, s).

    One ``roi_align`` per level on just that level's rois. (Pooling every roi on every level and
    masking avoids a host sync on CUDA, but multiplies ROIAlign's slow scatter-add backward by the
    number of levels: measured 5x slower on CPU in benchmarks/speed.py.)
    """
    k, c = rois.shape[0], features[0].shape[1]
    out = features[0].new_zeros((k, c, output_size, output_size))
    for lvl, (feature, stride) in enumerate(zip(features, strides)):
        idx = torch.nonzero(level_index == lvl).squeeze(1)
        if idx.numel() == 0:
            continue
        pooled = roi_align(
            feature, rois[idx], output_size, spatial_scale=1.0 / stride, sampling_ratio=sampling_ratio, aligned=True
        )  # (k_l, C, s, s)
        out = out.index_copy(0, idx, pooled.to(out.dtype))
    return out
