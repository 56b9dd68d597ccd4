"""Faster R-CNN's second stage in GID (``DistillConfig.second_stage``).

GISM runs on the RPN (``gid_core.dense``): its objectness is one class-agnostic column, so the
GI score sees no class disagreement, and the response loss never reaches the box head. With the
second stage on, each step:

1. GISM keeps ``second_stage_pool * top_k`` RPN candidates per image (NMS survivors, so any subset
   of them is still free of duplicates);
2. the candidates go as *shared proposals* through the teacher's and the student's box heads
   (``box_roi_pool`` + ``box_head`` + ``box_predictor``), each on its own FPN: row k of both
   outputs is the same box, one to one;
3. the class-wise discrepancy of the second stage, ``max_c |P_t(c) - P_s(c)|`` over the foreground
   classes of the softmax probabilities, joins the RPN's GI score. The paper's score is a max over
   the class columns of a prediction; here the prediction has the RPN's objectness column and the
   box head's class columns, so the combined score is the max over both:
   ``max(score_rpn, score_rcnn)``;
4. the ``top_k`` best candidates per image by that score are the general instances, and the
   second-stage response loss (``gid_core.losses.rcnn_response_loss``) distils the box head's
   class logits and box deltas on them.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn


def box_head_outputs(
    model: nn.Module,
    features: list[Tensor],
    names: list[str],
    boxes: Tensor,
    counts: list[int],
    image_sizes: list[tuple[int, int]],
) -> tuple[Tensor, Tensor]:
    """Faster R-CNN's box branch on given proposals: (K, C+1) class logits, (K, C+1, 4) deltas.

    Args:
        model: a torchvision ``FasterRCNN``.
        features, names: its FPN maps and their names (the ROI pool selects maps by name).
        boxes: (K, 4) xyxy proposals of all images, grouped by image; ``counts``: K per image.
    """
    heads = model.roi_heads
    proposals = list(boxes.split(counts))
    x = heads.box_roi_pool(OrderedDict(zip(names, features)), proposals, image_sizes)
    logits, deltas = heads.box_predictor(heads.box_head(x))
    return logits, deltas.reshape(logits.shape[0], -1, 4)


def class_discrepancy(t_logits: Tensor, s_logits: Tensor) -> Tensor:
    """(K,) max over the foreground classes of |softmax(t) - softmax(s)|, in float32 (no gradient).

    Background (column 0) is left out, as in the dense views: its probability is 1 minus the
    foreground's, so it adds no information and would rank confident-background disagreements."""
    with torch.no_grad():
        p_t = torch.softmax(t_logits.float(), dim=-1)[:, 1:]
        p_s = torch.softmax(s_logits.float(), dim=-1)[:, 1:]
        return (p_t - p_s).abs().amax(dim=-1) if p_t.shape[0] else p_t.new_zeros(0)


def top_k_per_image(scores: Tensor, image_index: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` best scores of each image, grouped by image (ascending), score-descending
    within it. Ties keep the earlier index."""
    order = scores.argsort(descending=True, stable=True)
    order = order[image_index[order].argsort(stable=True)]
    grouped = image_index[order]  # ascending
    rank = torch.arange(grouped.numel(), device=grouped.device) - torch.searchsorted(grouped, grouped)
    return order[rank < k]
