"""Dense-prediction views of torchvision detectors: what GID reads from teacher and student.

GID compares teacher and student prediction by prediction, so it needs, for each detector family,
the same four things on the same ``R`` anchors (or points):

* ``probs``  (N, R, C')  class probabilities GISM scores (float32),
* ``boxes``  (N, R, 4)   decoded xyxy boxes GISM selects from (float32),
* ``logits`` (N, R, L) and ``reg`` (N, R, 4): raw head outputs the response loss distils,

plus the FPN maps for ROIAlign and, for the student, its own ground-truth losses computed from the
very same forward pass (no second student forward).

Family choices:

* **RetinaNet** — probs = sigmoid(cls logits); logits = cls logits; reg = box deltas.
* **FCOS** — probs = sqrt(sigmoid(cls) * sigmoid(centerness)), the score FCOS itself ranks
  detections by; logits = cls logits with the centerness logit appended as one more column (so the
  response loss distils centerness too); reg = the ltrb regression.
* **Faster R-CNN** — the paper does not say which stage feeds GISM. We use the RPN: it is the only
  dense, one-to-one aligned prediction of teacher and student (the second stage runs on
  proposals that differ between the two networks). probs = sigmoid(objectness) (one
  class-agnostic "class"); boxes = decoded proposals; the response loss distils objectness and RPN
  deltas on anchors the RPN matcher assigns to a GI. The student's ROI heads still train on ground
  truth, and the feature/relation losses on GI features shape its FPN, which the ROI heads read;
  with ``DistillConfig.second_stage`` the GI boxes also go through both box heads as shared
  proposals (``gid_core.second_stage``).

Class column 0 (background, unused by RetinaNet/FCOS since labels start at 1) is left out of
``probs`` so it never drives a GI score.

Under mixed precision the heads return float16/bfloat16; torchvision's box coders decode in the
dtype of the deltas (anchors included), which at float16 spaces coordinates above 2048 by 2 px and
overflows ``exp`` of large deltas. Every view decodes and scores in float32 (``_f32``); the raw
``logits``/``reg`` the losses read keep the autocast dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers


AnchorsFn = Callable[[ImageList, list[Tensor]], list[Tensor]]


@dataclass
class DenseOutputs:
    features: list[Tensor]  # FPN maps, each (N, C, H_l, W_l)
    probs: Tensor  # (N, R, C')
    boxes: Tensor  # (N, R, 4) xyxy, clipped to the image, detached
    logits: Tensor  # (N, R, L)
    reg: Tensor  # (N, R, 4)
    gt_losses: dict[str, Tensor] = field(default_factory=dict)
    feature_names: list[str] = field(default_factory=list)  # Faster R-CNN: its box ROI pool picks maps by name


def _f32(x: Tensor) -> Tensor:
    return x.to(torch.float32)


def clip_boxes_batched(boxes: Tensor, image_sizes: list[tuple[int, int]]) -> Tensor:
    """Clip (N, R, 4) boxes to each image's (h, w) in one op."""
    hw = torch.tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)  # (N, 2)
    upper = hw.flip(1).repeat(1, 2)[:, None, :]  # (N, 1, 4) = w, h, w, h
    return torch.minimum(boxes.clamp(min=0), upper)


def box_iou_batched(a: Tensor, b: Tensor) -> Tensor:
    """IoU of (N, K, 4) against (N, R, 4) -> (N, K, R).

    Coordinate by coordinate on (N, K, 1) and (N, 1, R) operands, in place after the first op: the
    (N, K, R, 2) corner tensors of the textbook form cost 4x more here (8 images of 192 px, R = 6.9k
    anchors, K = 10: 8.5 -> 1.9 ms), with the same arithmetic, so the same bits."""
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    ca = a.transpose(1, 2)[:, :, :, None]  # (N, 4, K, 1)
    cb = b.transpose(1, 2).contiguous()[:, :, None, :]  # (N, 4, 1, R)
    w = torch.minimum(ca[:, 2], cb[:, 2]).sub_(torch.maximum(ca[:, 0], cb[:, 0])).clamp_(min=0)
    h = torch.minimum(ca[:, 3], cb[:, 3]).sub_(torch.maximum(ca[:, 1], cb[:, 1])).clamp_(min=0)
    inter = w.mul_(h)
    union = (area_a[:, :, None] + area_b[:, None, :]).sub_(inter).clamp_(min=1e-12)
    return inter.div_(union)


def iou_matcher_positive(
    gi_boxes: Tensor, valid: Tensor, anchors: Tensor, *, high: float, allow_low_quality: bool
) -> Tensor:
    """Anchors a torchvision ``Matcher`` would assign to some GI box, for a whole batch at once.

    gi_boxes (N, K, 4) padded, valid (N, K) bool, anchors (N, R, 4) -> positive (N, R) bool.
    Same rule as ``Matcher.__call__`` + ``set_low_quality_matches_``: best IoU >= high, or the anchor
    is (one of) the highest-IoU anchors of some GI that overlaps any anchor.
    """
    iou = box_iou_batched(gi_boxes, anchors).masked_fill_(~valid[:, :, None], -1.0)  # (N, K, R)
    positive = iou.amax(dim=1) >= high
    if allow_low_quality:
        best_per_gi = iou.amax(dim=2, keepdim=True)  # (N, K, 1)
        # A GI that overlaps no anchor at all would tie every anchor at IoU 0 and make them all
        # "best": torchvision's Matcher does that for a degenerate box; we skip such GIs.
        usable = valid[:, :, None] & (best_per_gi > 0)
        positive |= (iou == best_per_gi).logical_and_(usable).any(dim=1)
    return positive


class DenseView:
    """Runs one detector family's backbone + dense head without its post-processing."""

    # probs/logits columns are the detector's classes (False: class-agnostic, as the RPN's objectness)
    per_class = True

    def __call__(self, model: nn.Module, images: ImageList, anchors_fn: AnchorsFn, targets=None) -> DenseOutputs:
        """Backbone + dense head of ``model``; with targets, also its ground-truth losses.

        ``anchors_fn(images, features)`` gives the anchors (cached by the caller: they depend only
        on shapes, and teacher and student share them)."""
        raise NotImplementedError

    def positive_mask(
        self, student: nn.Module, gi_boxes: Tensor, valid: Tensor, anchors: Tensor, num_per_level: list[int]
    ) -> Tensor:
        """(N, R) bool: predictions the student's own matcher assigns to a GI box."""
        raise NotImplementedError

    def response_classes(self, model: nn.Module) -> int | None:
        """The classes ``logits``' columns stand for (the response BCE is normalised by them); None
        for a class-agnostic head. RetinaNet and FCOS: the foreground classes (column 0 is unused
        background)."""
        return model.head.classification_head.num_classes - 1 if self.per_class else None

    @staticmethod
    def anchor_generator(model: nn.Module):
        return model.anchor_generator


class RetinaNetView(DenseView):
    def __call__(self, model, images, anchors_fn, targets=None):
        features = list(model.backbone(images.tensors).values())
        anchors = anchors_fn(images, features)
        head = model.head(features)  # cls_logits (N, R, C+1), bbox_regression (N, R, 4)
        stacked = _f32(torch.stack(anchors))  # (N, R, 4)
        n, r, _ = stacked.shape
        deltas = _f32(head["bbox_regression"].detach())
        boxes = model.box_coder.decode_single(deltas.reshape(-1, 4), stacked.reshape(-1, 4))
        out = DenseOutputs(
            features=features,
            probs=_f32(head["cls_logits"][..., 1:]).sigmoid(),
            boxes=clip_boxes_batched(boxes.view(n, r, 4), images.image_sizes),
            logits=head["cls_logits"],
            reg=head["bbox_regression"],
        )
        if targets is not None:
            out.gt_losses = model.compute_loss(targets, head, anchors)
        return out

    def positive_mask(self, student, gi_boxes, valid, anchors, num_per_level):
        m = student.proposal_matcher
        return iou_matcher_positive(
            gi_boxes, valid, anchors, high=m.high_threshold, allow_low_quality=m.allow_low_quality_matches
        )


class FCOSView(DenseView):
    def __call__(self, model, images, anchors_fn, targets=None):
        features = list(model.backbone(images.tensors).values())
        anchors = anchors_fn(images, features)
        head = model.head(features)  # cls_logits (N,R,C+1), bbox_regression (N,R,4), bbox_ctrness (N,R,1)
        stacked = _f32(torch.stack(anchors))
        boxes = model.box_coder.decode(_f32(head["bbox_regression"].detach()), stacked)  # (N, R, 4)
        probs = torch.sqrt(_f32(head["cls_logits"][..., 1:]).sigmoid() * _f32(head["bbox_ctrness"]).sigmoid())
        out = DenseOutputs(
            features=features,
            probs=probs,
            boxes=clip_boxes_batched(boxes, images.image_sizes),
            logits=torch.cat([head["cls_logits"], head["bbox_ctrness"]], dim=-1),
            reg=head["bbox_regression"],
        )
        if targets is not None:
            num_per_level = [f.shape[-2] * f.shape[-1] for f in features]
            out.gt_losses = model.compute_loss(targets, head, anchors, num_per_level)
        return out

    def positive_mask(self, student, gi_boxes, valid, anchors, num_per_level):
        """FCOS's assignment (``FCOS.compute_loss``) batched over images and padded GIs."""
        centers = (anchors[..., :2] + anchors[..., 2:]) / 2  # (N, R, 2)
        sizes = anchors[..., 2] - anchors[..., 0]  # (N, R)
        gi_centers = (gi_boxes[..., :2] + gi_boxes[..., 2:]) / 2  # (N, K, 2)
        # centre sampling: the point lies within radius * stride of the GI centre
        match = (centers[:, :, None, :] - gi_centers[:, None, :, :]).abs().amax(dim=3) < (
            student.center_sampling_radius * sizes[:, :, None]
        )  # (N, R, K)
        x, y = centers[..., 0:1], centers[..., 1:2]  # (N, R, 1)
        x0, y0, x1, y1 = (gi_boxes[..., i][:, None, :] for i in range(4))  # (N, 1, K)
        ltrb = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=3)  # (N, R, K, 4)
        match &= ltrb.amin(dim=3) > 0
        # scale range of each level; the first level has no lower bound, the last no upper
        lower = sizes * 4
        lower[:, : num_per_level[0]] = 0
        upper = sizes * 8
        upper[:, -num_per_level[-1] :] = float("inf")
        reach = ltrb.amax(dim=3)
        match &= (reach > lower[:, :, None]) & (reach < upper[:, :, None])
        match &= valid[:, None, :]
        return match.any(dim=2)


class FasterRCNNView(DenseView):
    """GISM and the response loss on the RPN (see the module docstring)."""

    per_class = False

    def __call__(self, model, images, anchors_fn, targets=None):
        feature_dict = model.backbone(images.tensors)
        features = list(feature_dict.values())
        anchors = anchors_fn(images, features)
        rpn = model.rpn
        objectness, deltas = rpn.head(features)
        num_per_level = [o[0].numel() for o in objectness]  # A * H * W per level
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)  # (N*R, 1), (N*R, 4)
        n = len(anchors)
        stacked = _f32(torch.stack(anchors))
        proposals = rpn.box_coder.decode_single(_f32(deltas.detach()), stacked.reshape(-1, 4)).view(n, -1, 4)
        logits = objectness.view(n, -1, 1)
        out = DenseOutputs(
            features=features,
            probs=_f32(logits).sigmoid(),
            boxes=clip_boxes_batched(proposals, images.image_sizes),
            logits=logits,
            reg=deltas.view(n, -1, 4),
            feature_names=list(feature_dict),
        )
        if targets is not None:
            # The rest of RegionProposalNetwork.forward, then the ROI heads, as GeneralizedRCNN does.
            boxes, _ = rpn.filter_proposals(proposals, objectness, images.image_sizes, num_per_level)
            labels, matched_gt = rpn.assign_targets_to_anchors(anchors, targets)
            regression_targets = rpn.box_coder.encode(matched_gt, anchors)
            loss_objectness, loss_rpn_box_reg = rpn.compute_loss(objectness, deltas, labels, regression_targets)
            _, roi_losses = model.roi_heads(feature_dict, boxes, images.image_sizes, targets)
            out.gt_losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg, **roi_losses}
        return out

    def positive_mask(self, student, gi_boxes, valid, anchors, num_per_level):
        m = student.rpn.proposal_matcher
        return iou_matcher_positive(
            gi_boxes, valid, anchors, high=m.high_threshold, allow_low_quality=m.allow_low_quality_matches
        )

    @staticmethod
    def anchor_generator(model):
        return model.rpn.anchor_generator


def dense_view_for(model: nn.Module) -> DenseView:
    if isinstance(model, RetinaNet):
        return RetinaNetView()
    if isinstance(model, FCOS):
        return FCOSView()
    if isinstance(model, FasterRCNN):
        return FasterRCNNView()
    raise TypeError(f"GID supports torchvision RetinaNet, FCOS and FasterRCNN, not {type(model).__name__}")
