"""The three GID distillation losses (Dai et al., CVPR 2021, Sec. 3.2), on already-pooled tensors.

* Feature-based (``feature_loss``): squared L2 distance between the teacher's and the adapted
  student's RoI-aligned GI features, summed over channels, averaged over the K instances and the
  h*w pooled cells.
* Relation-based (``relation_loss``): the pairwise Euclidean distances between the GI embeddings of
  one image, each matrix divided by its mean off-diagonal distance (so only the *shape* of the
  instance relations is matched, not their scale), compared with smooth-L1 over all K(K-1) ordered
  pairs i != j and averaged over them. ``relation_loss_batched`` averages it over the images of a
  batch that have at least two GIs (one batched (N, K_max, K_max) computation).
* Peer method FitNet (``fitnet_loss``, ``DistillConfig.method = "fitnet"``): the feature loss on
  whole FPN maps instead of GI patches, averaged over every map position the same way.
* Response-based (``response_loss``): on the dense predictions a GI mask selects, binary cross
  entropy of the student's class logits against the teacher's sigmoid probabilities, and L1 between
  the regression outputs, each summed and divided by the number of selected predictions.
  ``rcnn_response_loss`` is its Faster R-CNN second-stage counterpart on the box head's outputs for
  the GI boxes (softmax KL on class logits, smooth L1 on the teacher's class's box deltas).

Teacher tensors are targets: no gradient ever reaches them. Every loss is a 0-dim tensor that is
still connected to the student's graph when there is nothing to distil (an exact 0), so DDP sees
the same parameters used on every rank.

``normalizer`` (DDP): a float or 0-dim tensor replacing the local count in the denominator, e.g.
the global count over all ranks divided by the world size (DDP averages gradients), so it may be
fractional. ``feature_loss`` and ``relation_loss_batched`` use it as given when positive and divide
by 1 when it is <= 0 (nothing to distil anywhere: the loss is an exact 0, never NaN);
``response_loss`` divides by max(1, normalizer), like its default max(1, mask.sum()).

Scale normalisation (``reference_channels``, ``num_classes``): the feature loss sums over the
teacher's FPN channels and the response BCE over classes, so their size grows with the FPN width
and the class count, and the paper's loss weights only fit its 256-channel FPN on 80-class COCO.
With ``reference_channels=R`` the channel sum becomes R times the channel mean (``sum * R / C``);
with ``num_classes=C`` the class sum becomes 80 times the class mean (``sum * 80 / C``). At 256
channels / 80 classes both factors are exactly 1 (the paper's losses, unchanged); a model with its
channels or classes duplicated gets the same loss. ``GIDDistiller`` passes ``REFERENCE_CHANNELS``
and the student's foreground class count (``DistillConfig.normalize_losses``). The relation loss
is already free of both (distances divided by their mean).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .roi import slot_within_image

# Distances are sqrt(max(d^2, _EPS^2)): finite gradients at zero distance, and no 0/0 when all
# embeddings of an image coincide (every distance is then _EPS, the mean _EPS, the ratio 1).
_EPS = 1e-6

# The paper's setting, which its loss weights were tuned on: a 256-channel FPN and COCO's 80 classes.
REFERENCE_CHANNELS = 256
REFERENCE_CLASSES = 80

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


# Blocks of the blocked computations below hold at most this many elements (1 MiB of float64): a
# temporary as large as the GI features (16 MiB for the teacher's at K = 40, over 32 MiB as a float64
# copy) is mapped fresh by glibc and page-faulted in on every step, which cost more than its arithmetic.
_BLOCK_ELEMENTS = 1 << 17


class _SumSquaredError(torch.autograd.Function):
    """sum((s - t)^2), ``t`` a target. One fused ``mse_loss`` per block of rows (a whole-tensor
    ``mse_loss(reduction="sum")`` first writes every squared error to a temporary as large as its
    inputs); the gradient 2 (s - t) is one pass, as ``mse_loss``'s."""

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor) -> Tensor:
        ctx.save_for_backward(s, t)
        rows = max(1, _BLOCK_ELEMENTS // max(s[0].numel(), 1))
        total = s.new_zeros(())
        for start in range(0, s.shape[0], rows):
            total += F.mse_loss(s[start : start + rows], t[start : start + rows], reduction="sum")
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        s, t = ctx.saved_tensors
        return (s - t).mul_(2.0 * grad), None


def feature_loss(
    t: Tensor, s: Tensor, *, normalizer: Normalizer = None, reference_channels: int | None = None
) -> Tensor:
    """Feature distillation loss: sum (t - s)^2 / (K * h * w), times ``reference_channels / C`` if given.

    Args:
        t: (K, C, h, w) teacher GI features (target).
        s: (K, C, h, w) student GI features, already through the adapter.
        normalizer: replaces K (e.g. the global GI count under DDP).
        reference_channels: R: the channel sum is read as R channels' worth (R times the mean over
            the C channels), so the loss weight does not depend on the FPN width.
    """
    if t.dim() != 4 or t.shape != s.shape:
        raise ValueError(
            f"feature_loss: t and s must both be (K, C, h, w) with equal shapes, "
            f"got {tuple(t.shape)} and {tuple(s.shape)}"
        )
    num, channels, h, w = s.shape
    if num == 0:
        return s.sum() * 0.0
    dtype = _compute_dtype(s)
    squared = _SumSquaredError.apply(s.to(dtype), t.detach().to(dtype))
    return feature_loss_from_sum(squared, num=num, channels=channels, cells=h * w, normalizer=normalizer,
                                 reference_channels=reference_channels)


def feature_loss_from_sum(
    squared: Tensor, *, num: int, channels: int, cells: int, normalizer: Normalizer = None,
    reference_channels: int | None = None,
) -> Tensor:
    """``feature_loss`` from its sum of squared errors over ``num`` GIs of ``channels`` x ``cells``
    values each (``GIDDistiller`` with ``adapter_on="maps"`` sums them without the patches)."""
    if reference_channels is not None:
        squared = squared * (reference_channels / channels)
    count = torch.tensor(float(num), dtype=squared.dtype, device=squared.device)
    return squared / (_divisor(count, normalizer, at_least_one=False) * cells)


def fitnet_loss(
    t_maps: list[Tensor], s_maps: list[Tensor], *, normalizer: Normalizer = None, reference_channels: int | None = None
) -> Tensor:
    """FitNet-style imitation (Romero et al., 2015) of whole FPN maps, the peer of ``feature_loss``.

    sum over levels, images, positions and channels of (t - s)^2, divided by the number of map
    positions (images x sum of H_l * W_l), times ``reference_channels / C`` if given: the mean over
    every position of the channel sum, as ``feature_loss`` is the mean over GI cells, so the same
    weight fits both.

    Args:
        t_maps: per level (N, C, H_l, W_l) teacher maps (targets).
        s_maps: the student's maps of the same shapes, already through the adapter.
        normalizer: replaces the number of positions (e.g. the global count under DDP).
    """
    if len(t_maps) != len(s_maps) or not s_maps:
        raise ValueError(f"fitnet_loss: need the same non-zero number of levels, got {len(t_maps)} and {len(s_maps)}")
    for t, s in zip(t_maps, s_maps):
        if t.dim() != 4 or t.shape != s.shape or t.shape[:2] != t_maps[0].shape[:2]:
            raise ValueError(
                f"fitnet_loss: each level must be (N, C, H, W) with equal shapes, got {tuple(t.shape)} and {tuple(s.shape)}"
            )
    dtype = _compute_dtype(s_maps[0])
    squared = sum((s.to(dtype) - t.detach().to(dtype)).pow(2).sum() for t, s in zip(t_maps, s_maps))
    num, channels = s_maps[0].shape[:2]
    if reference_channels is not None:
        squared = squared * (reference_channels / channels)
    count = torch.tensor(float(num * sum(s.shape[-2] * s.shape[-1] for s in s_maps)), dtype=dtype, device=squared.device)
    return squared / _divisor(count, normalizer, at_least_one=False)


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


def _centred_blocks(x: Tensor, counts: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(start column, block) of (N, K_max, D) ``x`` in float64, each block centred on each image's
    mean over its ``counts`` (float64) rows.

    Centring keeps distances and makes the Gram-matrix form |a|^2 + |b|^2 - 2ab lose far less
    precision to cancellation. Padded rows (zeros) become -mean: their distances are finite and
    masked out by ``pairs`` (value and gradient)."""
    width = max(1, _BLOCK_ELEMENTS // max(x.shape[0] * x.shape[1], 1))
    for start in range(0, x.shape[2], width):
        block = x[:, :, start : start + width].to(torch.float64)
        yield start, block.sub_(block.sum(dim=1, keepdim=True) / counts.clamp(min=1)[:, None, None])


def _centred_gram(x: Tensor, counts: Tensor) -> Tensor:
    """(N, K_max, K_max) float64 Gram matrices of the centred rows of (N, K_max, D) ``x``, summed
    over column blocks: no float64 copy of ``x`` is ever whole."""
    gram = None
    for _, block in _centred_blocks(x, counts):
        product = torch.bmm(block, block.transpose(1, 2))
        gram = product if gram is None else gram.add_(product)
    return gram


class _CentredGram(torch.autograd.Function):
    """``_centred_gram`` with its gradient computed block by block as well (autograd through the
    blocks would keep every float64 block and scatter each block's gradient into a full-size zero
    tensor). With C = x - mean (all K_max rows, mean over ``counts``) and G = C C^T:
    dL/dC = (dL/dG + dL/dG^T) C and dL/dx = dL/dC - (sum over rows of dL/dC) / count."""

    @staticmethod
    def forward(ctx, x: Tensor, counts: Tensor) -> Tensor:
        ctx.save_for_backward(x, counts)
        return _centred_gram(x, counts)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        x, counts = ctx.saved_tensors
        sym = grad + grad.transpose(1, 2)
        grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
        for start, block in _centred_blocks(x, counts):
            grad_c = torch.bmm(sym, block)
            grad_c -= grad_c.sum(dim=1, keepdim=True) / counts.clamp(min=1)[:, None, None]
            grad_x[:, :, start : start + block.shape[2]] = grad_c
        return grad_x, None


def _padded_distances(padded: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised distance matrices of the instances of each image, batched over the images.

    Args:
        padded: (N, K_max, D) embeddings, image n's in rows [0, counts[n]) and zeros after them;
            any float dtype (the distances are computed in float64).
        counts: (N,) int64 instances per image.

    Returns:
        phi (N, K_max, K_max) float64 (meaningful only where ``pairs``), pairs (N, K_max, K_max)
        bool (both real instances, i != j).
    """
    kmax = padded.shape[1]
    real = torch.arange(kmax, device=padded.device)[None, :] < counts[:, None]  # (N, K_max)
    counts = counts.to(torch.float64)
    if torch.is_grad_enabled() and padded.requires_grad:
        gram = _CentredGram.apply(padded, counts)  # (N, K_max, K_max)
    else:
        gram = _centred_gram(padded, counts)
    sq = gram.diagonal(dim1=1, dim2=2)
    dist = (sq[:, :, None] + sq[:, None, :] - 2.0 * gram).clamp(min=_EPS**2).sqrt()
    pairs = real[:, :, None] & real[:, None, :]
    pairs &= ~torch.eye(kmax, dtype=torch.bool, device=padded.device)
    mean_dist = ((dist * pairs).sum(dim=(1, 2)) / (counts * (counts - 1)).clamp(min=1)).clamp(min=_EPS)  # (N,)
    return dist / mean_dist[:, None, None], pairs


def _image_layout(image_index: Tensor, counts: Tensor) -> tuple[int, bool]:
    """(K_max, grouped): the one host sync of the relation loss. ``grouped``: the rows come image
    by image and every image has K_max of them (the distiller's usual batch: GISM's top-K per
    image, in image order), so padding them per image is a view."""
    grouped = (image_index[1:] >= image_index[:-1]).all() & (counts == counts.max()).all()
    kmax, grouped = torch.stack([counts.max(), grouped.long()]).tolist()
    return kmax, bool(grouped)


def _pad_by_image(x: Tensor, image_index: Tensor, counts: Tensor, kmax: int, grouped: bool) -> Tensor:
    """(K, D) rows -> (N, K_max, D), image n's rows first in their order, zeros after them."""
    num_images = counts.shape[0]
    if grouped:
        return x.reshape(num_images, kmax, x.shape[1])
    slot = slot_within_image(image_index, counts)
    return x.new_zeros((num_images, kmax, x.shape[1])).index_put((image_index, slot), x)


def relation_loss_batched(
    t: Tensor, s: Tensor, image_index: Tensor, num_images: int, *, normalizer: Normalizer = None
) -> Tensor:
    """``relation_loss`` of every image of a batch, averaged over the images with >= 2 GIs.

    Instances of different images are never compared. Vectorised as one batched (N, K_max, K_max)
    distance computation (``bmm`` on the embeddings padded per image, Gram form, centred per
    image) in float64; one host sync (K_max). Returns the student's dtype (>= float32).

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
    counts = torch.bincount(image_index, minlength=num_images)
    layout = _image_layout(image_index, counts)
    # float64 distances: the Gram form cancels badly for near-duplicate instances in float32 (and
    # overflows float16 under AMP).
    with torch.autocast(device_type=s.device.type, enabled=False):
        with torch.no_grad():
            target, _ = _padded_distances(_pad_by_image(t.flatten(1), image_index, counts, *layout), counts)
        pred, pairs = _padded_distances(_pad_by_image(s.flatten(1), image_index, counts, *layout), counts)
        pair_loss = F.smooth_l1_loss(pred, target, beta=1.0, reduction="none") * pairs
        counts = counts.to(pred.dtype)
        image_loss = pair_loss.sum(dim=(1, 2)) / (counts * (counts - 1)).clamp(min=1)  # 0 for images with < 2 GIs
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
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Response distillation losses on the dense predictions selected by ``mask``.

    Args:
        t_logits, s_logits: (..., C) class logits (teacher: target).
        t_reg, s_reg: (..., 4) box regression outputs (teacher: target).
        mask: (...) bool, the predictions to distil (e.g. (N, R)).
        normalizer: replaces mask.sum() (e.g. the global count under DDP).
        num_classes: the C classes the logit columns stand for (not always their number: a
            background or centerness column may come along); the class sum is then scaled by
            ``REFERENCE_CLASSES / C``. None: unscaled (a class-agnostic head, e.g. RPN objectness).

    Returns:
        cls: sum over selected rows and classes of BCE(s_logits, sigmoid(t_logits)) / max(1, count)
            (times ``REFERENCE_CLASSES / num_classes`` if given);
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
    if num_classes is not None:
        bce = bce * (REFERENCE_CLASSES / num_classes)
    reg = s_reg.to(target.dtype)
    l1 = (reg - t_reg.detach().to(reg.dtype)).abs().sum(dim=-1)  # (...)
    # torch.where, not boolean indexing: no host sync, and unselected rows get exactly 0 gradient.
    zero = bce.new_zeros(())
    divisor = _divisor(mask.sum().to(bce.dtype), normalizer, at_least_one=True)
    return torch.where(mask, bce, zero).sum() / divisor, torch.where(mask, l1, zero).sum() / divisor


def rcnn_response_loss(
    t_logits: Tensor,
    s_logits: Tensor,
    t_deltas: Tensor,
    s_deltas: Tensor,
    *,
    temperature: float = 1.0,
    normalizer: Normalizer = None,
) -> tuple[Tensor, Tensor]:
    """Response distillation of Faster R-CNN's second stage on K shared proposals (the GI boxes).

    Args:
        t_logits, s_logits: (K, C+1) box-predictor class logits, column 0 background (teacher: target).
        t_deltas, s_deltas: (K, C+1, 4) class-specific box deltas (teacher: target).
        temperature: T of the soft targets; the KL term is multiplied by T^2 (Hinton et al.) so its
            gradients keep their size whatever T.
        normalizer: replaces K (e.g. the global GI count under DDP); divides by max(1, normalizer).

    Returns:
        cls: T^2 * sum_k KL(softmax(t_k / T) || softmax(s_k / T)) / max(1, count): 0 when the student
            agrees; a softmax is a distribution, so its size does not grow with the class count.
        reg: sum_k (1 - p_t(bg | k)) * smoothL1_{beta=1/9}(s_k[c*] - t_k[c*]) / max(1, count), where c*
            is the teacher's most likely foreground class and p_t its softmax (T = 1): the teacher's
            box for the class it would report, weighted by its belief that the proposal is an object
            (Faster R-CNN regresses foreground proposals only; beta is its own 1/9).
    """
    num = s_logits.shape[0]
    if t_logits.shape != s_logits.shape or s_logits.dim() != 2 or s_logits.shape[1] < 2:
        raise ValueError(
            f"rcnn_response_loss: t_logits and s_logits must both be (K, C+1) with C >= 1, "
            f"got {tuple(t_logits.shape)} and {tuple(s_logits.shape)}"
        )
    if t_deltas.shape != s_deltas.shape or tuple(s_deltas.shape) != (*s_logits.shape, 4):
        raise ValueError(
            f"rcnn_response_loss: t_deltas and s_deltas must both be {(*s_logits.shape, 4)}, "
            f"got {tuple(t_deltas.shape)} and {tuple(s_deltas.shape)}"
        )
    dtype = _compute_dtype(s_logits)
    t_logits = t_logits.detach().to(dtype)
    log_p_s = torch.log_softmax(s_logits.to(dtype) / temperature, dim=-1)
    log_p_t = torch.log_softmax(t_logits / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1) * temperature**2  # (K,)

    p_t = torch.softmax(t_logits, dim=-1)
    best = 1 + p_t[:, 1:].argmax(dim=-1)  # (K,) teacher's foreground class
    rows = torch.arange(num, device=s_deltas.device)
    s_box, t_box = s_deltas[rows, best].to(dtype), t_deltas.detach()[rows, best].to(dtype)  # (K, 4)
    l1 = F.smooth_l1_loss(s_box, t_box, beta=1.0 / 9, reduction="none").sum(dim=-1) * (1.0 - p_t[:, 0])  # (K,)

    divisor = _divisor(torch.tensor(float(num), dtype=dtype, device=s_logits.device), normalizer, at_least_one=True)
    # Sums over K rows are connected zeros when K == 0 (DDP sees the box head used on every rank).
    return kl.sum() / divisor, l1.sum() / divisor
