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


def _axis_weights(start: Tensor, end: Tensor, size: int, pooled: int, sampling_ratio: int) -> Tensor:
    """ROIAlign's sampling along one axis as a matrix: (K,) roi start/end in map cells -> (K, pooled, size).

    Row p holds the bilinear weights of bin p's samples, averaged: torchvision's ``roi_align``
    (aligned=True) sample positions, clamping and out-of-map rule, one axis at a time. A sample
    outside [-1, size] weighs 0; otherwise it is clamped into the map and split between its two
    neighbouring cells. Bilinear interpolation and the bin average are both products of a
    y-factor and an x-factor, so the 2-D pooling is ``Wy @ F @ Wx^T``."""
    k = start.shape[0]
    length = end - start
    bin_size = length / pooled
    if sampling_ratio > 0:
        grid = torch.full_like(start, float(sampling_ratio))
        max_grid = sampling_ratio
    else:  # adaptive: ceil(roi size / pooled) samples per bin, per roi (one host sync)
        grid = torch.ceil(length / pooled)
        max_grid = max(int(grid.max()) if k else 0, 1)
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)[None, :, None]
    i = torch.arange(max_grid, dtype=start.dtype, device=start.device)[None, None, :]
    start_, bin_, grid_ = start[:, None, None], bin_size[:, None, None], grid[:, None, None]
    # the same expression, in the same order, as torchvision's kernel
    pos = start_ + p * bin_ + (i + 0.5) * bin_ / grid_.clamp(min=1)  # (K, pooled, max_grid)
    used = (i < grid_) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0)
    low = pos.floor().clamp(max=size - 1)
    pos = torch.where(low >= size - 1, low, pos)
    high = (low + 1).clamp(max=size - 1)
    frac = pos - low
    scale = used.to(start.dtype) / grid_.clamp(min=1)
    weights = start.new_zeros((k, pooled, size))
    weights.scatter_add_(2, low.long(), (1.0 - frac) * scale)
    weights.scatter_add_(2, high.long(), frac * scale)
    return weights


def pool_instances(
    features: list[Tensor],
    rois: Tensor,
    level_index: Tensor,
    strides: list[int],
    *,
    output_size: int,
    sampling_ratio: int,
) -> Tensor:
    """ROIAlign (K, 5) rois [batch_idx, x1, y1, x2, y2] on their level -> (K, C, s, s), channels-last.

    Equal (to float rounding) to ``torchvision.ops.roi_align(..., aligned=True)`` of each roi on its
    own level, computed as two batched matrix products per level, ``Wy @ F @ Wx^T``, with the rois
    padded per (level, image). On the CPU, torchvision's ROIAlign backward is a single-threaded
    scatter-add that cost more than all the GID losses together (benchmarks/speed.py); here forward
    and backward are GEMMs, with one host sync for all levels. ``tests/gid_core/test_roi.py`` and
    ``tests/gid_core/test_gid_speed_exactness.py`` check values and gradients against ``roi_align``.

    The result is in channels-last memory (K, s, s, C), the order the GEMMs produce: the earlier
    (K, C, s, s) order took a (s_y <-> C) transpose, a strided gather and a scatter per level, 4/5
    of the pooling's time at K = 40; and the adapter conv is faster on channels-last input (on the
    CPU, measured at K = 40: forward ~2x, forward + backward ~1.3x).
    """
    num_rois, channels = rois.shape[0], features[0].shape[1]
    if num_rois == 0:
        return features[0].new_zeros((0, channels, output_size, output_size))
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    num_images, num_levels = features[0].shape[0], len(features)
    image_index = rois[:, 0].long()
    # group the rois by (level, image): each level pools only its own rois, padded per image
    group = level_index * num_images + image_index
    counts = torch.bincount(group, minlength=num_levels * num_images)
    in_order = (group[1:] >= group[:-1]).all().reshape(1).long()
    host = torch.cat([counts, in_order]).tolist()  # the one host sync
    per_group = [host[lvl * num_images : (lvl + 1) * num_images] for lvl in range(num_levels)]
    order = torch.argsort(group, stable=True)
    slot = slot_within_image(group, counts)
    boxes = rois[:, 1:].detach().to(dtype)  # as roi_align: no gradient to the boxes
    shape = (num_rois, output_size, output_size, channels)
    # one level holding every roi, already in (level, image) order: its result is the output as is
    whole = host[-1] and max(sum(c) for c in per_group) == num_rois
    out, start = None if whole else features[0].new_empty(shape, dtype=dtype), 0
    for lvl, (feature, stride) in enumerate(zip(features, strides)):
        num = sum(per_group[lvl])
        idx, start = order[start : start + num], start + num
        if num == 0:
            continue
        _, _, height, width = feature.shape
        if height == 0 or width == 0:  # nothing to sample (roi_align gives zeros)
            pooled = feature.new_zeros((num, *shape[1:]), dtype=dtype)
        else:
            scaled = boxes[idx] / stride - 0.5  # aligned=True: pixel centres at half-integers
            wy = _axis_weights(scaled[:, 1], scaled[:, 3], height, output_size, sampling_ratio)
            wx = _axis_weights(scaled[:, 0], scaled[:, 2], width, output_size, sampling_ratio)
            pooled = _separable_pool_nhwc(feature.to(dtype), wy, wx, image_index[idx], slot[idx], per_group[lvl])
        # autocast may compute the GEMMs in bfloat16 / float16
        if whole:
            out = pooled.to(dtype)
        else:  # in place: rows of every level land in one buffer, no concatenation and reordering
            out.index_copy_(0, idx, pooled.to(dtype))
    return out.permute(0, 3, 1, 2).to(features[0].dtype)


def slot_within_image(image_index: Tensor, counts: Tensor) -> Tensor:
    """(K,) position of each row among the rows of its image (in the given order), for padding a
    flat (K, ...) batch into (N, K_max, ...); ``counts`` (N,) rows per image."""
    order = torch.argsort(image_index, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.empty_like(image_index)
    slot[order] = torch.arange(image_index.shape[0], device=image_index.device) - starts[image_index[order]]
    return slot


def _separable_pool_nhwc(
    feature: Tensor, wy: Tensor, wx: Tensor, image_index: Tensor, slot: Tensor, per_image: list[int]
) -> Tensor:
    """(K, s_y, s_x, C): row k is wy[k] @ feature[image_index[k], c] @ wx[k]^T for every channel c,
    for (K, s, H) wy and (K, s, W) wx; ``slot`` and ``per_image`` as ``slot_within_image``.

    The first ``bmm`` contracts H for the rois of each image at once on its (H, W C) map (rois padded
    per image); the second contracts W roi by roi and output row by row, (s_x, W) @ (W, C), so the
    result comes out channels-last with no transpose."""
    n, c, h, w = feature.shape
    s, kmax = wy.shape[1], max(per_image)
    wy_pad = wy.new_zeros((n, kmax, s, h)).index_put_((image_index, slot), wy)
    fmap = feature.permute(0, 2, 3, 1).reshape(n, h, w * c)  # (N, H, W C): a view if channels-last
    rows = torch.bmm(wy_pad.view(n, kmax * s, h), fmap).view(n * kmax, s, w, c)  # (N K_max, s_y, W, C)
    if min(per_image) < kmax:  # padding rows: keep those of the rois (given in image order, so
        rows = rows.index_select(0, image_index * kmax + slot)  # with no padding they are the rows)
    return torch.matmul(wx[:, None], rows)  # (K, 1, s_x, W) @ (K, s_y, W, C) -> (K, s_y, s_x, C)


def pooled_sum_of_squares(
    maps: list[Tensor],
    rois: Tensor,
    level_index: Tensor,
    strides: list[int],
    per_level: list[list[int]],
    *,
    output_size: int,
    sampling_ratio: int,
) -> Tensor:
    """sum over rois k of ||ROIAlign_k(maps[level_index[k]])||^2 (``pool_instances``'s pooling),
    differentiable in ``maps``; float32 or wider. ``per_level[l][n]``: rois of image n on level l
    (the caller's host copy of the counts).

    The feature loss with the adapter on the maps is this sum over D = adapter(S) - T: pooling is
    linear, so pooling D once equals pooling both maps and subtracting. Per level, the cheaper of two
    equal computations: pooling every roi, or the quadratic form sum_c d_c^T Q_n d_c of each image's
    map, Q_n = sum_k My_k (x) Mx_k with My_k = Wy_k^T Wy_k (H x H) and Mx_k = Wx_k^T Wx_k: an
    image's rois collapse into one (H W)^2 matrix, which wins on small maps (a 64 px input's P3 is
    8 x 8) and is never built on large ones. No cancellation: both forms sum squares of the pooled
    differences, the second with its terms regrouped."""
    dtype = torch.promote_types(maps[0].dtype, torch.float32)
    total = maps[0].new_zeros((), dtype=dtype)
    num_images = maps[0].shape[0]
    image_index = rois[:, 0].long()
    boxes = rois[:, 1:].detach().to(dtype)
    pooled_levels = []
    for lvl, (feature, stride) in enumerate(zip(maps, strides)):
        num, (_, channels, height, width) = sum(per_level[lvl]), feature.shape
        if num == 0 or height == 0 or width == 0:
            continue
        if not _quadratic_form_pays(num_images=num_images, height=height, width=width, channels=channels, num_rois=num,
                                    max_per_image=max(per_level[lvl]), output_size=output_size):
            pooled_levels.append(lvl)
            continue
        area = height * width
        rows = torch.nonzero(level_index == lvl).flatten()
        scaled = boxes[rows] / stride - 0.5  # aligned=True, as pool_instances
        wy = _axis_weights(scaled[:, 1], scaled[:, 3], height, output_size, sampling_ratio)
        wx = _axis_weights(scaled[:, 0], scaled[:, 2], width, output_size, sampling_ratio)
        with torch.autocast(device_type=feature.device.type, enabled=False):  # a sum of squares: >= float32
            q = _image_quadratic_form(wy, wx, image_index[rows], num_images, max(per_level[lvl]))
            d = feature.to(dtype).reshape(num_images, channels, area)
            total = total + (torch.bmm(d, q) * d).sum()  # q symmetric: the gradient is 2 d q
    if pooled_levels:
        rows = torch.nonzero(torch.isin(level_index, torch.tensor(pooled_levels, device=level_index.device))).flatten()
        pooled = pool_instances(maps, rois[rows], level_index[rows], strides, output_size=output_size,
                                sampling_ratio=sampling_ratio)
        flat = pooled.permute(0, 2, 3, 1).reshape(-1).to(dtype)  # channels-last: a view
        total = total + torch.dot(flat, flat)
    return total


# The quadratic form holds an (N, (H W)^2) matrix per level: never more elements than this.
_MAX_QUADRATIC_ELEMENTS = 1 << 22


def _quadratic_form_pays(*, num_images: int, height: int, width: int, channels: int, num_rois: int,
                         max_per_image: int, output_size: int) -> bool:
    """Whether a level's sum of squares costs fewer multiply-adds (forward and backward) as the
    quadratic form than by pooling its rois, within ``_MAX_QUADRATIC_ELEMENTS``."""
    area = height * width
    if num_images * area * area > _MAX_QUADRATIC_ELEMENTS:
        return False
    quadratic = num_images * area * area * (max_per_image + 3 * channels)
    pooling = 3 * num_rois * output_size * width * (height + output_size) * channels
    return quadratic < pooling


def _image_quadratic_form(wy: Tensor, wx: Tensor, image_index: Tensor, num_images: int, kmax: int) -> Tensor:
    """(N, H W, H W): Q_n[(y, x), (z, w)] = sum over image n's rois k of (Wy_k^T Wy_k)[y, z] (Wx_k^T Wx_k)[x, w],
    for (K, s, H) ``wy`` and (K, s, W) ``wx``."""
    k, h, w = wy.shape[0], wy.shape[2], wx.shape[2]
    my = torch.bmm(wy.transpose(1, 2), wy).reshape(k, h * h)  # (K, (y, z))
    mx = torch.bmm(wx.transpose(1, 2), wx).reshape(k, w * w)  # (K, (x, w))
    slot = slot_within_image(image_index, torch.bincount(image_index, minlength=num_images))
    pad_y = my.new_zeros((num_images, kmax, h * h)).index_put_((image_index, slot), my)
    pad_x = mx.new_zeros((num_images, kmax, w * w)).index_put_((image_index, slot), mx)
    q = torch.bmm(pad_y.transpose(1, 2), pad_x).view(num_images, h, h, w, w)  # (n, y, z, x, w)
    return q.permute(0, 1, 3, 2, 4).reshape(num_images, h * w, h * w)
