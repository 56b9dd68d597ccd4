"""The three GID distillation losses (Dai et al., CVPR 2021, Sec. 3.2), on already-pooled tensors.

* Feature-based (``feature_loss``): squared L2 distance between the teacher's and the adapted
  student's RoI-aligned GI features, summed over channels, averaged over the K instances and the
  h*w pooled cells.
* Relation-based (``relation_loss``): the pairwise Euclidean distances between the GI embeddings of
  one image, each matrix divided by its mean off-diagonal distance (so only the *shape* of the
  instance relations is matched, not their scale), compared with smooth-L1 over all K(K-1) ordered
  pairs i != j and averaged over them. ``relation_loss_batched`` averages it over the images of a
  batch that have at least two GIs.
* Response-based (``response_loss``): on the dense predictions a GI mask selects, binary cross
  entropy of the student's class logits against the teacher's sigmoid probabilities, and L1 between
  the regression outputs, each summed and divided by the number of selected predictions.

Teacher tensors are targets: no gradient ever reaches them. Every loss is a 0-dim tensor that is
still connected to the student's graph when there is nothing to distil (an exact 0), so DDP sees
the same parameters used on every rank.

``normalizer`` (DDP): a float or 0-dim tensor replacing the local count in the denominator, e.g.
the global count over all ranks divided by the world size (DDP averages gradients), so it may be
fractional. ``feature_loss`` and ``relation_loss_batched`` use it as given when positive and divide
by 1 when it is <= 0 (nothing to distil anywhere: the loss is an exact 0, never NaN);
``response_loss`` divides by max(1, normalizer), like its default max(1, mask.sum()).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Distances are sqrt(max(d^2, _EPS^2)): finite gradients at zero distance, and no 0/0 when all
# embeddings of an image coincide (every distance is then _EPS, the mean _EPS, the ratio 1).
_EPS = 1e-6

Normalizer = float | int | Tensor | None


def _divisor(count: Tensor, normalizer: Normalizer, *, at_least_one: bool) -> Tensor:
    """The denominator, a tensor on count's device (no host sync).

    Without normalizer: max(1, count). With it: max(1, normalizer) if ``at_least_one``, else the
    normalizer itself when positive and 1 otherwise.
    """
    if normalizer is None:
        return count.clamp(min=1)
    value = torch.as_tensor(normalizer, dtype=count.dtype, device=count.device)
    if at_least_one:
        return value.clamp(min=1)
    return torch.where(value > 0, value, torch.ones_like(value))


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Sums of squares over thousands of feature dims overflow float16: work in >= float32.
    return torch.promote_types(x.dtype, torch.float32)


def feature_loss(t: Tensor, s: Tensor, *, normalizer: Normalizer = None) -> Tensor:
    """Feature distillation loss: sum (t - s)^2 / (K * h * w).

    Args:
        t: (K, C, h, w) teacher GI features (target).
        s: (K, C, h, w) student GI features, already through the adapter.
        normalizer: replaces K (e.g. the global GI count under DDP).
    """
    if t.dim() != 4 or t.shape != s.shape:
        raise ValueError(
            f"feature_loss: t and s must both be (K, C, h, w) with equal shapes, "
            f"got {tuple(t.shape)} and {tuple(s.shape)}"
        )
    num, _, h, w = s.shape
    if num == 0:
        return s.sum() * 0.0
    dtype = _compute_dtype(s)
    squared = (s.to(dtype) - t.detach().to(dtype)).pow(2).sum()
    count = torch.tensor(float(num), dtype=dtype, device=s.device)
    return squared / (_divisor(count, normalizer, at_least_one=False) * (h * w))


def _check_relation_inputs(t: Tensor, s: Tensor) -> None:
    if t.dim() < 1 or s.dim() < 1 or t.shape[0] != s.shape[0]:
        raise ValueError(
            f"relation loss: t and s must be (K, ...) with the same K, got {tuple(t.shape)} and {tuple(s.shape)}"
        )


def _pair_distances(x: Tensor) -> Tensor:
    """(K, D) -> (K(K-1)/2,) distances of the pairs i < j divided by their mean."""
    num = x.shape[0]
    i, j = torch.triu_indices(num, num, offset=1, device=x.device)
    dist = (x[i] - x[j]).pow(2).sum(dim=1).clamp(min=_EPS**2).sqrt()
    # Distances are symmetric: the mean over i < j is the mean over all off-diagonal entries.
    return dist / dist.mean().clamp(min=_EPS)


def relation_loss(t: Tensor, s: Tensor) -> Tensor:
    """Relation distillation loss of one image.

    Args:
        t: (K, D_t...) teacher GI embeddings (target); flattened to (K, D_t).
        s: (K, D_s...) student GI embeddings; flattened to (K, D_s). D_s may differ from D_t.

    Returns:
        sum over i != j of smoothL1(phi_s(i, j) - phi_t(i, j)) / (K (K - 1)), where phi is the
        Euclidean distance divided by the mean off-diagonal distance; 0 when K < 2.
    """
    _check_relation_inputs(t, s)
    if s.shape[0] < 2:
        return s.sum() * 0.0
    with torch.no_grad():
        target = _pair_distances(t.flatten(1).to(_compute_dtype(t)))
    pred = _pair_distances(s.flatten(1).to(_compute_dtype(s)))
    # Each unordered pair stands for the two ordered pairs (i, j) and (j, i): the mean is the same.
    return F.smooth_l1_loss(pred, target.to(pred.dtype), beta=1.0, reduction="mean")


def _block_distances(x: Tensor, image_index: Tensor, num_images: int) -> tuple[Tensor, Tensor, Tensor]:
    """Normalised distance matrix of all instances of a batch, comparing only within an image.

    Args:
        x: (K, D) embeddings; image_index: (K,) image of each row.

    Returns:
        phi (K, K) (meaningful only where ``pairs``), pairs (K, K) bool (same image, i != j),
        counts (num_images,) instances per image.
    """
    num, dim = x.shape
    ones = torch.ones(num, dtype=x.dtype, device=x.device)
    counts = x.new_zeros(num_images).index_add_(0, image_index, ones)  # (N,)
    # Centre each image's embeddings on their mean: distances are unchanged, and the Gram-matrix
    # form |a|^2 + |b|^2 - 2ab loses far less precision to cancellation.
    means = x.new_zeros(num_images, dim).index_add_(0, image_index, x) / counts.clamp(min=1)[:, None]
    x = x - means[image_index]
    gram = x @ x.T  # (K, K)
    sq = gram.diagonal()
    dist = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp(min=_EPS**2).sqrt()  # (K, K)
    pairs = image_index[:, None] == image_index[None, :]
    pairs.fill_diagonal_(False)
    row_sums = (dist * pairs).sum(dim=1)  # (K,)
    image_sums = x.new_zeros(num_images).index_add_(0, image_index, row_sums)  # (N,)
    mean_dist = (image_sums / (counts * (counts - 1)).clamp(min=1)).clamp(min=_EPS)  # (N,)
    return dist / mean_dist[image_index][:, None], pairs, counts


def relation_loss_batched(
    t: Tensor, s: Tensor, image_index: Tensor, num_images: int, *, normalizer: Normalizer = None
) -> Tensor:
    """``relation_loss`` of every image of a batch, averaged over the images with >= 2 GIs.

    Instances of different images are never compared. Vectorised with one block-masked
    (K_total, K_total) distance matrix computed in float64 (Gram form, embeddings centred per
    image); no host-device synchronisation. Returns the student's dtype (>= float32).

    Args:
        t: (K_total, D_t...) teacher GI embeddings (target); s: (K_total, D_s...) student ones.
        image_index: (K_total,) int64 image of each instance, in [0, num_images).
        num_images: N, the batch size.
        normalizer: replaces the number of images with >= 2 GIs (e.g. the global count under DDP).
    """
    _check_relation_inputs(t, s)
    if image_index.shape != (s.shape[0],) or image_index.dtype != torch.int64:
        raise ValueError(
            f"relation_loss_batched: image_index must be int64 of shape ({s.shape[0]},), "
            f"got {image_index.dtype} {tuple(image_index.shape)}"
        )
    if num_images < 1:
        raise ValueError(f"relation_loss_batched: num_images must be >= 1, got {num_images}")
    if s.shape[0] == 0:
        return s.sum() * 0.0
    # float64 throughout: the Gram form of distances cancels badly for near-duplicate instances in
    # float32 (and overflows float16 under AMP); the matrices are only (K_total, K_total), so the
    # cost is negligible next to the detector.
    with torch.autocast(device_type=s.device.type, enabled=False):
        with torch.no_grad():
            target, _, _ = _block_distances(t.flatten(1).double(), image_index, num_images)
        pred, pairs, counts = _block_distances(s.flatten(1).double(), image_index, num_images)
        pair_loss = F.smooth_l1_loss(pred, target, beta=1.0, reduction="none") * pairs
        image_loss = pred.new_zeros(num_images).index_add_(0, image_index, pair_loss.sum(dim=1))
        image_loss = image_loss / (counts * (counts - 1)).clamp(min=1)  # 0 for images with < 2 GIs
        num_valid = (counts >= 2).sum().to(pred.dtype)
        loss = image_loss.sum() / _divisor(num_valid, normalizer, at_least_one=False)
    return loss.to(_compute_dtype(s))


def response_loss(
    t_logits: Tensor,
    s_logits: Tensor,
    t_reg: Tensor,
    s_reg: Tensor,
    mask: Tensor,
    *,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Tensor]:
    """Response distillation losses on the dense predictions selected by ``mask``.

    Args:
        t_logits, s_logits: (..., C) class logits (teacher: target).
        t_reg, s_reg: (..., 4) box regression outputs (teacher: target).
        mask: (...) bool, the predictions to distil (e.g. (N, R)).
        normalizer: replaces mask.sum() (e.g. the global count under DDP).

    Returns:
        cls: sum over selected rows and classes of BCE(s_logits, sigmoid(t_logits)) / max(1, count);
        reg: sum over selected rows of |s_reg - t_reg|_1 / max(1, count).
    """
    lead = tuple(mask.shape)
    if mask.dtype != torch.bool:
        raise ValueError(f"response_loss: mask must be bool, got {mask.dtype}")
    if t_logits.shape != s_logits.shape or tuple(s_logits.shape[:-1]) != lead:
        raise ValueError(
            f"response_loss: t_logits and s_logits must both be {lead + ('C',)}, "
            f"got {tuple(t_logits.shape)} and {tuple(s_logits.shape)}"
        )
    if t_reg.shape != s_reg.shape or tuple(s_reg.shape) != lead + (4,):
        raise ValueError(
            f"response_loss: t_reg and s_reg must both be {lead + (4,)}, "
            f"got {tuple(t_reg.shape)} and {tuple(s_reg.shape)}"
        )
    target = torch.sigmoid(t_logits.detach().to(_compute_dtype(t_logits)))
    logits = s_logits.to(target.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=-1)  # (...)
    reg = s_reg.to(target.dtype)
    l1 = (reg - t_reg.detach().to(reg.dtype)).abs().sum(dim=-1)  # (...)
    # torch.where, not boolean indexing: no host sync, and unselected rows get exactly 0 gradient.
    zero = bce.new_zeros(())
    divisor = _divisor(mask.sum().to(bce.dtype), normalizer, at_least_one=True)
    return torch.where(mask, bce, zero).sum() / divisor, torch.where(mask, l1, zero).sum() / divisor
