"""Issue #12 item 5: each speed change of the GID step against the computation it replaced.

The previous implementations are kept here, verbatim in substance, as references:
  * ROIAlign of each GI on its level with ``torchvision.ops.roi_align`` (one call per level), now
    two batched GEMMs per level (``gid_core.roi.pool_instances``);
  * the relation loss on one block-masked (K_total, K_total) distance matrix, now a batched
    (N, K_max, K_max) computation (``gid_core.losses.relation_loss_batched``).
  * (second round) the relation loss's per-image padding by zero-fill + scatter + mask and its
    float64 copies, now a view when the GIs come image by image, K each; the feature loss as
    sub + pow + sum, now one fused ``mse_loss``; ``pool_instances`` writing each level with an
    out-of-place ``index_copy`` into a zero-filled result, now in place; GISM's first NMS prefix
    of max(16 K, 128) candidates, now max(4 K, 64) (``round_one_implementations`` swaps all four
    back).
  * (third round) ``pool_instances`` returning (K, C, s, s) contiguous through a transpose, a strided
    gather and a scatter per level, now channels-last straight from its GEMMs (the adapter conv is
    faster on it too); the relation loss through whole float64 copies of the embeddings (over 32 MiB
    at K = 40, page-faulted in fresh every step), now a float64 Gram summed over column blocks with
    its own blocked gradient, on the patches in memory order; the feature loss's whole-tensor
    ``mse_loss`` temporary, now summed over row blocks (``previous_implementations`` swaps round 2's
    code back, for ``python -m benchmarks.speed --compare-previous``).
  * (fourth round) the response mask's IoU on (N, K, R, 2) corner tensors and out-of-place mask and
    max ops, now coordinate by coordinate and in place: bit-identical (``previous_implementations``
    swaps it back too).
Values and gradients must agree to float rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

import gid_core.dense
import gid_core.distill
import gid_core.losses
from gid_core import gism
from gid_core.losses import (
    _EPS, Normalizer, _compute_dtype, _divisor, _image_layout, _pad_by_image, feature_loss, relation_loss_batched,
)
from gid_core.roi import _axis_weights, pool_instances, slot_within_image

STRIDES = [8, 16, 32]


# ----------------------------------------------------------------------------- references


def _roi_align_per_level(features, rois, level_index, strides, *, output_size, sampling_ratio):
    """The previous ``pool_instances``: one ``roi_align`` per level on that level's rois."""
    k, c = rois.shape[0], features[0].shape[1]
    out = features[0].new_zeros((k, c, output_size, output_size))
    for lvl, (feature, stride) in enumerate(zip(features, strides)):
        idx = torch.nonzero(level_index == lvl).squeeze(1)
        if idx.numel() == 0:
            continue
        pooled = roi_align(feature, rois[idx], output_size, spatial_scale=1.0 / stride,
                           sampling_ratio=sampling_ratio, aligned=True)
        out = out.index_copy(0, idx, pooled.to(out.dtype))
    return out


def _block_distances(x, image_index, num_images):
    num, dim = x.shape
    ones = torch.ones(num, dtype=x.dtype)
    counts = x.new_zeros(num_images).index_add_(0, image_index, ones)
    means = x.new_zeros(num_images, dim).index_add_(0, image_index, x) / counts.clamp(min=1)[:, None]
    x = x - means[image_index]
    gram = x @ x.T
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp(min=_EPS**2).sqrt()
    pairs = image_index[:, None] == image_index[None, :]
    pairs.fill_diagonal_(False)
    row_sums = (dist * pairs).sum(dim=1)
    image_sums = x.new_zeros(num_images).index_add_(0, image_index, row_sums)
    mean_dist = (image_sums / (counts * (counts - 1)).clamp(min=1)).clamp(min=_EPS)
    return dist / mean_dist[image_index][:, None], pairs, counts


def _relation_block_masked(t, s, image_index, num_images, normalizer=None):
    """The previous ``relation_loss_batched``: one block-masked (K_total, K_total) matrix."""
    with torch.no_grad():
        target, _, _ = _block_distances(t.flatten(1).double(), image_index, num_images)
    pred, pairs, counts = _block_distances(s.flatten(1).double(), image_index, num_images)
    pair_loss = F.smooth_l1_loss(pred, target, beta=1.0, reduction="none") * pairs
    image_loss = pred.new_zeros(num_images).index_add_(0, image_index, pair_loss.sum(dim=1))
    image_loss = image_loss / (counts * (counts - 1)).clamp(min=1)
    num_valid = (counts >= 2).sum().to(pred.dtype)
    divisor = num_valid.clamp(min=1) if normalizer is None else torch.as_tensor(float(normalizer), dtype=pred.dtype)
    return (image_loss.sum() / divisor).to(torch.float32)


def _padded_distances_v1(x, image_index, slot, num_images, kmax):
    """Round 1's per-image distances: zero-filled padding, scatter, mask, all on a float64 copy."""
    dim = x.shape[1]
    padded = x.new_zeros((num_images, kmax, dim)).index_put((image_index, slot), x)
    real = torch.zeros((num_images, kmax), dtype=torch.bool).index_put(
        (image_index, slot), torch.ones_like(image_index, dtype=torch.bool)
    )
    counts = real.sum(dim=1).to(x.dtype)
    means = padded.sum(dim=1, keepdim=True) / counts.clamp(min=1)[:, None, None]
    padded = (padded - means) * real[:, :, None]
    gram = torch.bmm(padded, padded.transpose(1, 2))
    sq = gram.diagonal(dim1=1, dim2=2)
    dist = (sq[:, :, None] + sq[:, None, :] - 2.0 * gram).clamp(min=_EPS**2).sqrt()
    pairs = real[:, :, None] & real[:, None, :]
    pairs &= ~torch.eye(kmax, dtype=torch.bool)
    mean_dist = ((dist * pairs).sum(dim=(1, 2)) / (counts * (counts - 1)).clamp(min=1)).clamp(min=_EPS)
    return dist / mean_dist[:, None, None], pairs, counts


def _relation_padded_v1(t, s, image_index, num_images, *, normalizer=None):
    """Round 1's ``relation_loss_batched`` (the (N, K_max, K_max) form, before the lean padding)."""
    if s.shape[0] == 0:
        return s.sum() * 0.0
    counts = torch.bincount(image_index, minlength=num_images)
    slot = slot_within_image(image_index, counts)
    kmax = int(counts.max())
    with torch.no_grad():
        target, _, _ = _padded_distances_v1(t.flatten(1).double(), image_index, slot, num_images, kmax)
    pred, pairs, counts = _padded_distances_v1(s.flatten(1).double(), image_index, slot, num_images, kmax)
    pair_loss = F.smooth_l1_loss(pred, target, beta=1.0, reduction="none") * pairs
    image_loss = pair_loss.sum(dim=(1, 2)) / (counts * (counts - 1)).clamp(min=1)
    num_valid = (counts >= 2).sum().to(pred.dtype)
    loss = image_loss.sum() / _divisor(num_valid, normalizer, at_least_one=False)
    return loss.to(_compute_dtype(s))


def _feature_loss_v1(t, s, *, normalizer=None, reference_channels=None):
    """The previous ``feature_loss``: sub, pow and sum as three ops."""
    num, channels, h, w = s.shape
    if num == 0:
        return s.sum() * 0.0
    dtype = _compute_dtype(s)
    squared = (s.to(dtype) - t.detach().to(dtype)).pow(2).sum()
    if reference_channels is not None:
        squared = squared * (reference_channels / channels)
    count = torch.tensor(float(num), dtype=dtype)
    return squared / (_divisor(count, normalizer, at_least_one=False) * (h * w))


def _feature_loss_v2(t, s, *, normalizer=None, reference_channels=None):
    """Round 2's ``feature_loss``: one fused ``mse_loss`` on the whole tensors."""
    num, channels, h, w = s.shape
    if num == 0:
        return s.sum() * 0.0
    dtype = _compute_dtype(s)
    squared = F.mse_loss(s.to(dtype), t.detach().to(dtype), reduction="sum")
    if reference_channels is not None:
        squared = squared * (reference_channels / channels)
    count = torch.tensor(float(num), dtype=dtype, device=s.device)
    return squared / (_divisor(count, normalizer, at_least_one=False) * (h * w))


def _pool_instances_v1(features, rois, level_index, strides, *, output_size, sampling_ratio):
    """Round 1's GEMM ``pool_instances``: zero-filled result, one out-of-place copy per level."""
    num_rois, channels = rois.shape[0], features[0].shape[1]
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    out = features[0].new_zeros((num_rois, channels, output_size, output_size), dtype=dtype)
    if num_rois == 0:
        return out.to(features[0].dtype)
    num_images, num_levels = features[0].shape[0], len(features)
    image_index = rois[:, 0].long()
    group = level_index * num_images + image_index
    counts = torch.bincount(group, minlength=num_levels * num_images)
    slot = slot_within_image(group, counts)
    order = torch.argsort(group, stable=True)
    per_group = counts.view(num_levels, num_images).tolist()
    boxes = rois[:, 1:].detach().to(dtype)
    start = 0
    for lvl, (feature, stride) in enumerate(zip(features, strides)):
        num = sum(per_group[lvl])
        idx, start = order[start : start + num], start + num
        _, _, height, width = feature.shape
        if num == 0 or height == 0 or width == 0:
            continue
        scaled = boxes[idx] / stride - 0.5
        wy = _axis_weights(scaled[:, 1], scaled[:, 3], height, output_size, sampling_ratio)
        wx = _axis_weights(scaled[:, 0], scaled[:, 2], width, output_size, sampling_ratio)
        pooled = _separable_pool_v2(feature.to(dtype), wy, wx, image_index[idx], slot[idx], max(per_group[lvl]))
        out = out.index_copy(0, idx, pooled)
    return out.to(features[0].dtype)


def _separable_pool_v2(feature: Tensor, wy: Tensor, wx: Tensor, image_index: Tensor, slot: Tensor, kmax: int) -> Tensor:
    """out[k, c] = wy[k] @ feature[image of k, c] @ wx[k]^T for (K, s, H) wy and (K, s, W) wx."""
    n, c, h, w = feature.shape
    s = wy.shape[1]
    wy_pad = wy.new_zeros((n, kmax, s, h)).index_put((image_index, slot), wy)
    wx_pad = wx.new_zeros((n, kmax, s, w)).index_put((image_index, slot), wx)
    rows = torch.bmm(wy_pad.reshape(n, kmax * s, h), feature.permute(0, 2, 1, 3).reshape(n, h, c * w))
    rows = rows.reshape(n * kmax, s * c, w)  # (N K_max, s_y C, W)
    cells = torch.bmm(rows, wx_pad.reshape(n * kmax, s, w).transpose(1, 2))  # (N K_max, s_y C, s_x)
    cells = cells.reshape(n, kmax, s, c, s).permute(0, 1, 3, 2, 4)  # (N, K_max, C, s_y, s_x)
    return cells[image_index, slot]


def _pool_instances_v2(
    features: list[Tensor],
    rois: Tensor,
    level_index: Tensor,
    strides: list[int],
    *,
    output_size: int,
    sampling_ratio: int,
) -> Tensor:
    """Round 2's ``pool_instances``: (K, C, s, s) contiguous, a strided gather and an in-place
    ``index_copy_`` per level."""
    num_rois, channels = rois.shape[0], features[0].shape[1]
    dtype = torch.promote_types(features[0].dtype, torch.float32)
    # every row is written below (zeros for a level with an empty map): no zero-fill pass
    out = features[0].new_empty((num_rois, channels, output_size, output_size), dtype=dtype)
    if num_rois == 0:
        return out.to(features[0].dtype)
    num_images, num_levels = features[0].shape[0], len(features)
    image_index = rois[:, 0].long()
    # group the rois by (level, image): each level pools only its own rois, padded per image
    group = level_index * num_images + image_index
    counts = torch.bincount(group, minlength=num_levels * num_images)
    slot = slot_within_image(group, counts)
    order = torch.argsort(group, stable=True)
    per_group = counts.view(num_levels, num_images).tolist()  # the one host sync
    boxes = rois[:, 1:].detach().to(dtype)  # as roi_align: no gradient to the boxes
    start = 0
    for lvl, (feature, stride) in enumerate(zip(features, strides)):
        num = sum(per_group[lvl])
        idx, start = order[start : start + num], start + num
        _, _, height, width = feature.shape
        if num == 0:
            continue
        if height == 0 or width == 0:  # nothing to sample (roi_align gives zeros)
            out.index_fill_(0, idx, 0.0)
            continue
        scaled = boxes[idx] / stride - 0.5  # aligned=True: pixel centres at half-integers
        wy = _axis_weights(scaled[:, 1], scaled[:, 3], height, output_size, sampling_ratio)
        wx = _axis_weights(scaled[:, 0], scaled[:, 2], width, output_size, sampling_ratio)
        pooled = _separable_pool_v2(feature.to(dtype), wy, wx, image_index[idx], slot[idx], max(per_group[lvl]))
        # in place (an out-of-place copy per level copied every row); autocast may give bfloat16
        out.index_copy_(0, idx, pooled.to(dtype))
    return out.to(features[0].dtype)


def _padded_distances_v2(padded: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Round 2's ``_padded_distances``: one whole float64 copy of the embeddings, centred, one ``bmm``."""
    kmax = padded.shape[1]
    real = torch.arange(kmax, device=padded.device)[None, :] < counts[:, None]  # (N, K_max)
    counts = counts.to(torch.float64)
    # Centre each image's embeddings on their mean: distances are unchanged, and the Gram-matrix
    # form |a|^2 + |b|^2 - 2ab loses far less precision to cancellation. One float64 copy, then
    # one pass each for the means and the centring (at K = 40 these are the step's biggest tensors:
    # no zero-fill, scatter or mask passes). Padded rows become -mean: their distances are finite
    # and masked out by ``pairs`` (value and gradient).
    padded = padded.to(torch.float64)
    centred = padded - padded.sum(dim=1, keepdim=True) / counts.clamp(min=1)[:, None, None]
    gram = torch.bmm(centred, centred.transpose(1, 2))  # (N, K_max, K_max)
    sq = gram.diagonal(dim1=1, dim2=2)
    dist = (sq[:, :, None] + sq[:, None, :] - 2.0 * gram).clamp(min=_EPS**2).sqrt()
    pairs = real[:, :, None] & real[:, None, :]
    pairs &= ~torch.eye(kmax, dtype=torch.bool, device=padded.device)
    mean_dist = ((dist * pairs).sum(dim=(1, 2)) / (counts * (counts - 1)).clamp(min=1)).clamp(min=_EPS)  # (N,)
    return dist / mean_dist[:, None, None], pairs


def _relation_v2(
    t: Tensor, s: Tensor, image_index: Tensor, num_images: int, *, normalizer: Normalizer = None
) -> Tensor:
    """Round 2's ``relation_loss_batched`` (autograd through whole float64 copies)."""
    if image_index.shape != (s.shape[0],) or image_index.dtype != torch.int64:
        raise ValueError(
            f"relation_loss_batched: image_index must be int64 of shape ({s.shape[0]},), "
            f"got {image_index.dtype} {tuple(image_index.shape)}"
        )
    if num_images < 1:
        raise ValueError(f"relation_loss_batched: num_images must be >= 1, got {num_images}")
    if s.shape[0] == 0:
        return s.sum() * 0.0
    counts = torch.bincount(image_index, minlength=num_images)
    layout = _image_layout(image_index, counts)
    # float64 distances: the Gram form cancels badly for near-duplicate instances in float32 (and
    # overflows float16 under AMP).
    with torch.autocast(device_type=s.device.type, enabled=False):
        with torch.no_grad():
            target, _ = _padded_distances_v2(_pad_by_image(t.flatten(1), image_index, counts, *layout), counts)
        pred, pairs = _padded_distances_v2(_pad_by_image(s.flatten(1), image_index, counts, *layout), counts)
        pair_loss = F.smooth_l1_loss(pred, target, beta=1.0, reduction="none") * pairs
        counts = counts.to(pred.dtype)
        image_loss = pair_loss.sum(dim=(1, 2)) / (counts * (counts - 1)).clamp(min=1)  # 0 for images with < 2 GIs
        num_valid = (counts >= 2).sum().to(pred.dtype)
        loss = image_loss.sum() / _divisor(num_valid, normalizer, at_least_one=False)
    return loss.to(_compute_dtype(s))


_select_current = gism.select_general_instances_batched


def _select_v1(*args, top_k, **kwargs):
    """GISM with round 1's first NMS prefix, max(16 K, 128) candidates per image."""
    return _select_current(*args, top_k=top_k, first_prefix=max(16 * top_k, 128), **kwargs)


def _box_iou_v3(a: Tensor, b: Tensor) -> Tensor:
    """Rounds 1-3: IoU through (N, K, R, 2) corner tensors."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    lt = torch.maximum(a[:, :, None, :2], b[:, None, :, :2])
    rb = torch.minimum(a[:, :, None, 2:], b[:, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    return inter / (area_a[:, :, None] + area_b[:, None, :] - inter).clamp(min=1e-12)


def _iou_matcher_positive_v3(gi_boxes, valid, anchors, *, high, allow_low_quality):
    """Rounds 1-3: the response mask's matcher rule, out of place."""
    iou = _box_iou_v3(gi_boxes, anchors)
    iou = iou.masked_fill(~valid[:, :, None], -1.0)
    positive = iou.max(dim=1).values >= high
    if allow_low_quality:
        best_per_gi = iou.max(dim=2, keepdim=True).values
        usable = valid[:, :, None] & (best_per_gi > 0)
        positive |= ((iou == best_per_gi) & usable).any(dim=1)
    return positive


@contextlib.contextmanager
def round_one_implementations() -> Iterator[None]:
    """The GID step as it was before the second round: ``gid_core.distill`` calls round 1's code."""
    with contextlib.ExitStack() as stack:
        for name, fn in [("relation_loss_batched", _relation_padded_v1), ("feature_loss", _feature_loss_v1),
                         ("pool_instances", _pool_instances_v1), ("select_general_instances_batched", _select_v1),
                         ("_rows", _flat_rows)]:
            stack.enter_context(mock.patch.object(gid_core.distill, name, fn))
        yield


@contextlib.contextmanager
def previous_implementations() -> Iterator[None]:
    """The GID step as it was before the third round (round 2's code, and rounds 1-3's response
    mask), for ``python -m benchmarks.speed --compare-previous``."""
    with contextlib.ExitStack() as stack:
        for name, fn in [("relation_loss_batched", _relation_v2), ("pool_instances", _pool_instances_v2),
                         ("feature_loss", _feature_loss_v2), ("_rows", _flat_rows)]:
            stack.enter_context(mock.patch.object(gid_core.distill, name, fn))
        stack.enter_context(mock.patch.object(gid_core.dense, "iou_matcher_positive", _iou_matcher_positive_v3))
        yield


def _flat_rows(inst: Tensor) -> Tensor:
    """Rounds 1 and 2: the relation loss read (K, C, s, s) patches flattened as (C, s, s)."""
    return inst.flatten(1)


# ----------------------------------------------------------------------------- pooling


def _random_rois(g, num_images, per_image, size):
    rois = []
    for n, k in enumerate(per_image):
        xy = torch.rand(k, 2, generator=g) * size * 1.2 - 0.1 * size  # some start outside the map
        wh = torch.rand(k, 2, generator=g) * size * 0.8
        rois.append(torch.cat([torch.full((k, 1), float(n)), xy, xy + wh], dim=1))
    rois = torch.cat(rois)
    return rois[torch.randperm(rois.shape[0], generator=g)]  # images interleaved: order must not matter


@pytest.mark.parametrize("sampling_ratio", [2, 1, 0])
@pytest.mark.parametrize("seed", [0, 1])
def test_pool_instances_matches_roi_align_values_and_gradients(sampling_ratio: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    size, per_image = 64, [5, 0, 3, 7]
    features = [torch.randn(4, 6, size // s, size // s, generator=g, requires_grad=True) for s in STRIDES]
    rois = _random_rois(g, 4, per_image, size)
    rois = torch.cat([rois, torch.tensor([[2.0, 10.0, 10.0, 10.0, 20.0], [0.0, 70.0, 70.0, 90.0, 90.0]])])
    level_index = torch.randint(0, len(STRIDES), (rois.shape[0],), generator=g)
    upstream = torch.randn(rois.shape[0], 6, 7, 7, generator=g)

    def run(fn):
        out = fn(features, rois, level_index, STRIDES, output_size=7, sampling_ratio=sampling_ratio)
        grads = torch.autograd.grad((out * upstream).sum(), features)
        return out, grads

    out, grads = run(pool_instances)
    ref, ref_grads = run(_roi_align_per_level)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_pool_instances_no_rois_and_slots():
    features = [torch.randn(2, 3, 8, 8)]
    assert pool_instances(features, torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64), [8],
                          output_size=4, sampling_ratio=2).shape == (0, 3, 4, 4)
    image_index = torch.tensor([1, 0, 1, 1, 0])
    slot = slot_within_image(image_index, torch.bincount(image_index, minlength=2))
    assert slot.tolist() == [0, 0, 1, 2, 1]


# ----------------------------------------------------------------------------- relation


@pytest.mark.parametrize("counts", [[10, 10, 10, 10], [3, 0, 1, 7, 2], [1, 1], [40, 40]])
def test_relation_batched_matches_block_masked_values_and_gradients(counts: list[int]):
    g = torch.Generator().manual_seed(sum(counts))
    total = sum(counts)
    image_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    perm = torch.randperm(total, generator=g)  # instances need not be grouped by image
    image_index = image_index[perm]
    t = torch.randn(total, 12, generator=g)
    t[:2] = t[0]  # a duplicate pair: distance at the epsilon floor
    s = torch.randn(total, 5, generator=g, requires_grad=True)
    loss = relation_loss_batched(t, s, image_index, len(counts))
    ref = _relation_block_masked(t, s, image_index, len(counts))
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, s)
    (ref_grad,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)
    normalized = relation_loss_batched(t, s, image_index, len(counts), normalizer=2.5)
    torch.testing.assert_close(normalized, _relation_block_masked(t, s, image_index, len(counts), 2.5))


# ----------------------------------------------------------------------------- second round


@pytest.mark.parametrize("counts, grouped", [([10, 10, 10], True), ([10, 10, 10], False), ([3, 0, 1, 7], False),
                                             ([40, 40], True), ([1, 1], True)])
def test_relation_lean_padding_matches_round_one(counts: list[int], grouped: bool):
    """The view / single float64 copy path against round 1's zero-fill + scatter + mask."""
    g = torch.Generator().manual_seed(len(counts) + sum(counts))
    total = sum(counts)
    image_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    if not grouped:
        image_index = image_index[torch.randperm(total, generator=g)]
    t = torch.randn(total, 3, 4, 4, generator=g) + 5.0  # uncentred, as FPN features are
    t[1] = t[0]  # a duplicate: distance at the epsilon floor
    s = torch.randn(total, 2, 4, 4, generator=g, requires_grad=True)
    for normalizer in (None, 2.5):
        loss = relation_loss_batched(t.flatten(1), s.flatten(1), image_index, len(counts), normalizer=normalizer)
        ref = _relation_padded_v1(t.flatten(1), s.flatten(1), image_index, len(counts), normalizer=normalizer)
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
        (grad,) = torch.autograd.grad(loss, s)
        (ref_grad,) = torch.autograd.grad(ref, s)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_feature_loss_matches_round_one(dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(7, 16, 5, 5, generator=g, dtype=dtype)
    s = torch.randn(7, 16, 5, 5, generator=g, dtype=dtype, requires_grad=True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for kwargs in ({}, {"normalizer": 3.0, "reference_channels": 256}):
        loss, ref = feature_loss(t, s, **kwargs), _feature_loss_v1(t, s, **kwargs)
        torch.testing.assert_close(loss, ref, **tol)
        torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s)[0], **tol)


def test_in_place_pooling_matches_round_one_with_an_empty_level():
    g = torch.Generator().manual_seed(4)
    features = [torch.randn(3, 5, 64 // st, 64 // st, generator=g, requires_grad=True) for st in STRIDES]
    features.append(torch.zeros(3, 5, 0, 0, requires_grad=True))  # a level with an empty map
    rois = _random_rois(g, 3, [6, 2, 4], 64)
    level_index = torch.randint(0, 4, (rois.shape[0],), generator=g)
    level_index[:2] = 3
    upstream = torch.randn(rois.shape[0], 5, 6, 6, generator=g)
    results = []
    for fn in (_pool_instances_v2, _pool_instances_v1):
        out = fn(features, rois, level_index, [*STRIDES, 64], output_size=6, sampling_ratio=2)
        results.append((out, torch.autograd.grad((out * upstream).sum(), features[:3])))
    (out, grads), (ref, ref_grads) = results
    assert torch.equal(out, ref) and not out[level_index == 3].any()
    for got, expected in zip(grads, ref_grads):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("top_k", [10, 40])
def test_gism_short_first_prefix_matches_round_one(top_k: int):
    g = torch.Generator().manual_seed(top_k)
    n, r, c = 3, 3000, 4
    t_prob, s_prob = torch.rand(n, r, c, generator=g), torch.rand(n, r, c, generator=g)
    xy = torch.rand(n, r, 2, generator=g) * 200
    t_box = torch.cat([xy, xy + 5 + torch.rand(n, r, 2, generator=g) * 60], dim=-1)
    s_box = t_box + torch.randn(n, r, 4, generator=g)
    kwargs = dict(top_k=top_k, nms_iou=0.3, pre_nms_top_n=3000, min_size=2.0)
    got = gism.select_general_instances_batched(t_prob, t_box, s_prob, s_box, **kwargs)
    ref = _select_v1(t_prob, t_box, s_prob, s_box, **kwargs)
    for (boxes, scores), (ref_boxes, ref_scores) in zip(got, ref):
        assert boxes.shape[0] == top_k and torch.equal(boxes, ref_boxes) and torch.equal(scores, ref_scores)


# ----------------------------------------------------------------------------- third round


def _layout_rois(g, layout: str):
    """(rois, level_index) of 3 images on 3 levels, in the orders ``pool_instances`` treats apart."""
    per_image = {"whole": [5, 5, 5], "padded": [6, 2, 4], "interleaved": [6, 2, 4], "mixed": [7, 3, 5]}[layout]
    rois = _random_rois(g, 3, per_image, 64)
    if layout in ("whole", "padded"):  # image by image, one level: the output needs no reordering
        rois = rois[torch.argsort(rois[:, 0], stable=True)]
    level_index = torch.zeros(rois.shape[0], dtype=torch.int64)
    if layout == "mixed":
        level_index = torch.randint(0, 4, (rois.shape[0],), generator=g)
        level_index[:2] = 3  # a level with an empty map
    return rois, level_index


@pytest.mark.parametrize("layout", ["whole", "padded", "interleaved", "mixed"])
@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_channels_last_pooling_matches_round_two(layout: str, sampling_ratio: int):
    """Round 3's channels-last pooling (W contracted roi by roi, rows gathered before it, no
    transpose or per-level scatter of (K, C, s, s) rows) against round 2's, values and gradients."""
    g = torch.Generator().manual_seed(len(layout) + sampling_ratio)
    features = [torch.randn(3, 5, 64 // st, 64 // st, generator=g, requires_grad=True) for st in STRIDES]
    features.append(torch.zeros(3, 5, 0, 0, requires_grad=True))
    rois, level_index = _layout_rois(g, layout)
    upstream = torch.randn(rois.shape[0], 5, 6, 6, generator=g)
    results = []
    for fn in (pool_instances, _pool_instances_v2):
        out = fn(features, rois, level_index, [*STRIDES, 64], output_size=6, sampling_ratio=sampling_ratio)
        grads = torch.autograd.grad((out * upstream).sum(), features[:3], allow_unused=True)
        results.append((out, [torch.zeros_like(f) if d is None else d for f, d in zip(features, grads)]))
    (out, grads), (ref, ref_grads) = results
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("counts, grouped", [([10, 10, 10], True), ([3, 0, 1, 7], False), ([40, 40], True)])
def test_blocked_gram_relation_matches_round_two(monkeypatch, counts: list[int], grouped: bool):
    """The float64 Gram summed over column blocks, with its hand-written gradient, against round 2's
    whole float64 copy and autograd (blocks made small here, so that there are many)."""
    monkeypatch.setattr(gid_core.losses, "_BLOCK_ELEMENTS", 64)
    g = torch.Generator().manual_seed(sum(counts) + grouped)
    total = sum(counts)
    image_index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    if not grouped:
        image_index = image_index[torch.randperm(total, generator=g)]
    t = torch.randn(total, 37, generator=g) + 5.0  # uncentred, 37 columns: a last, narrower block
    t[1] = t[0]  # a duplicate: distance at the epsilon floor
    s = torch.randn(total, 23, generator=g, requires_grad=True)
    for normalizer in (None, 2.5):
        loss = relation_loss_batched(t, s, image_index, len(counts), normalizer=normalizer)
        ref = _relation_v2(t, s, image_index, len(counts), normalizer=normalizer)
        torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
        (grad,) = torch.autograd.grad(loss, s)
        (ref_grad,) = torch.autograd.grad(ref, s)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block", [64, 1 << 17])
def test_blocked_feature_loss_matches_round_two(monkeypatch, dtype: torch.dtype, block: int):
    """The feature loss summed over blocks of rows, with its own one-pass gradient, against round 2's
    whole-tensor ``mse_loss``, on channels-last patches as the distiller passes them."""
    monkeypatch.setattr(gid_core.losses, "_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(6)
    t = torch.randn(9, 16, 5, 5, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    s = torch.randn(9, 16, 5, 5, generator=g, dtype=dtype).contiguous(memory_format=torch.channels_last)
    s.requires_grad_(True)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
    for kwargs in ({}, {"normalizer": 3.0, "reference_channels": 256}):
        loss, ref = feature_loss(t, s, **kwargs), _feature_loss_v2(t, s, **kwargs)
        torch.testing.assert_close(loss, ref, **tol)
        grad, ref_grad = torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s)[0]
        assert torch.equal(grad, ref_grad)  # 2 (s - t) g either way: doubling is exact


def test_relation_on_memory_order_rows_matches_flattened():
    """The distiller's relation loss reads channels-last patches in memory order (a view), not
    flattened as (C, s, s): distances, and so the loss and its gradient, do not depend on it."""
    g = torch.Generator().manual_seed(5)
    image_index = torch.arange(4).repeat_interleave(6)
    t = torch.randn(24, 8, 5, 5, generator=g).contiguous(memory_format=torch.channels_last)
    s = torch.randn(24, 3, 5, 5, generator=g).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    rows = gid_core.distill._rows
    assert rows(t).data_ptr() == t.data_ptr() and rows(s)._base is not None  # views: nothing copied
    loss = relation_loss_batched(rows(t), rows(s), image_index, 4)
    ref = _relation_v2(_flat_rows(t), _flat_rows(s), image_index, 4)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss, s)[0], torch.autograd.grad(ref, s)[0], rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------- fourth round


@pytest.mark.parametrize("allow_low_quality", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_response_mask_matches_round_three_bit_for_bit(seed: int, allow_low_quality: bool):
    """The coordinate-wise, in-place IoU and matcher give the same bits as the corner-tensor form,
    with padded GI slots, a GI overlapping no anchor, a degenerate box, exact ties between anchors
    (duplicates) and broadcast (expanded) anchors as the distiller passes them."""
    from gid_core.dense import box_iou_batched, iou_matcher_positive

    g = torch.Generator().manual_seed(seed)
    n, k, r = 3, 7, 500
    xy = torch.rand(r, 2, generator=g) * 180
    anchors = torch.cat([xy, xy + torch.rand(r, 2, generator=g) * 60 + 2], dim=1)
    anchors[1] = anchors[0]  # a tie for the best anchor of whichever GI likes anchor 0
    anchors = anchors.expand(n, -1, -1)
    xy = torch.rand(n, k, 2, generator=g) * 150
    boxes = torch.cat([xy, xy + torch.rand(n, k, 2, generator=g) * 40 + 1], dim=2)
    boxes[0, 1] = torch.tensor([500.0, 500.0, 510.0, 510.0])  # overlaps no anchor
    boxes[1, 2] = torch.tensor([20.0, 20.0, 20.0, 30.0])  # zero width
    boxes[2, 0] = anchors[2, 0]  # IoU exactly 1
    valid = torch.rand(n, k, generator=g) > 0.2
    valid[0, 1] = valid[2, 0] = True
    assert torch.equal(box_iou_batched(boxes, anchors), _box_iou_v3(boxes, anchors))
    for high in (0.5, 0.7):
        got = iou_matcher_positive(boxes, valid, anchors, high=high, allow_low_quality=allow_low_quality)
        ref = _iou_matcher_positive_v3(boxes, valid, anchors, high=high, allow_low_quality=allow_low_quality)
        assert torch.equal(got, ref) and got.any() and got.dtype == torch.bool


@pytest.mark.parametrize("previous", [round_one_implementations, previous_implementations])
@pytest.mark.parametrize("top_k", [12, 40])
def test_gid_step_matches_previous_implementations(previous, top_k: int):
    """A whole distiller step, losses and every gradient, against round 1's and round 2's code swapped
    back in (K = 40: GIs on two FPN levels)."""
    from gid_core.config import DistillConfig, ModelConfig
    from gid_core.distill import GIDDistiller
    from gid_core.models import build_detector

    def model(backbone, fpn):
        return build_detector(ModelConfig(arch="retinanet", backbone=backbone, num_classes=3, fpn_channels=fpn,
                                          min_size=64, max_size=64))

    torch.manual_seed(0)
    distiller = GIDDistiller(model("resnet34", 64), model("resnet18", 32), DistillConfig(top_k=top_k)).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(3)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([2])} for _ in range(3)]
    params = [p for p in distiller.parameters() if p.requires_grad]

    def step():
        losses = distiller(images, targets)
        return losses, torch.autograd.grad(sum(losses.values()), params, allow_unused=True)

    losses, grads = step()
    with previous():
        ref_losses, ref_grads = step()
    assert losses.keys() == ref_losses.keys()
    for name in losses:
        torch.testing.assert_close(losses[name], ref_losses[name], rtol=1e-5, atol=1e-7, msg=name)
    for got, expected in zip(grads, ref_grads):
        if expected is None:
            assert got is None
        else:
            # K = 40: elements near zero of a gradient summed over many more GI terms carry float32
            # rounding of the tensor's scale (measured: 2e-6 of its largest element)
            atol = 1e-6 if top_k == 12 else max(1e-6, 1e-5 * float(expected.abs().max()))
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=atol)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("against", ["previous", "maps"])
def test_speed_compare_gid_steps_runs(tmp_path, against):
    """``python -m benchmarks.speed --compare-previous`` / ``--compare-adapter`` on a tiny batch: both
    variants timed, the second one really the other variant."""
    from benchmarks.speed import SpeedSetting, compare_gid_steps

    r = compare_gid_steps(SpeedSetting(batch_size=1, top_k=3, num_classes=2), against=against, iters=1, warmup=0,
                          data_dir=tmp_path / "data")
    assert r["overhead_ratio"] > 0 and r[f"overhead_ratio_{against}"] > 0
    assert len(r["samples_ms"][f"gid_step_{against}"]) == 1 and len(r["load_average_1min"]) == 2
    assert r["adapter_on"] == {"now": "instances", against: "maps" if against == "maps" else "instances"}


def test_speed_compare_gid_steps_refuses_unknown_variant():
    from benchmarks.speed import SpeedSetting, compare_gid_steps

    with pytest.raises(ValueError, match="against"):
        compare_gid_steps(SpeedSetting(batch_size=1), against="fastest")


@pytest.mark.parametrize("argv", [["--compare-previous", "--compare-adapter"],
                                  ["--compare-adapter", "--adapter-on", "maps"]])
def test_speed_cli_refuses_contradictory_comparisons(argv, capsys):
    from benchmarks.speed import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and "--compare-" in capsys.readouterr().err
