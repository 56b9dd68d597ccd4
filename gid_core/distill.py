"""GIDDistiller: General Instance Distillation (Dai et al., CVPR 2021) around two torchvision detectors.

One training step::

    images ──student.transform──► ImageList (shared: teacher and student see the same pixels)
      teacher (frozen, eval, no_grad): FPN maps + dense head  ──┐
      student (train):                 FPN maps + dense head  ──┼─► GISM: top-K general instances
                                       + its own GT losses      │        per image (boxes)
      ROIAlign(GI boxes) on both FPNs ─► feature loss (student through the 3x3 adapter)
                                      └► relation loss (pairwise-distance structure per image)
      student's matcher on GI boxes ──► response loss on the matched dense predictions

Choices where the paper is silent, each tested:

* The teacher runs at the student's input resolution (the student's transform feeds both), since
  GID matches predictions one to one; teacher and student must share the detector family, the
  anchor configuration and FPN strides (checked at construction).
* The adaptation conv is applied to the ROI-pooled student features (``adapter_on="instances"``,
  the default): the 3x3 conv on the region the loss reads. ``adapter_on="maps"`` applies it to the
  student's FPN maps and pools the adapted maps instead (adapt, then pool, as a public detectron2
  reproduction of GID does; the two differ at patch borders), which costs the maps' area rather than
  K patches. It is a registered submodule, so it is trained, checkpointed and saved with the
  distiller, and dropped on export (only ``.student`` is exported).
* The relation loss reads the student's own pooled features (before the adapter): the relation
  structure is scale- and dimension-free, and going through the adapter would let the adapter
  absorb what the student should learn.
* Loss normalisers (number of GIs, images with >= 2 GIs, matched predictions) are summed over DDP
  ranks, so a DDP step equals one process with the same global batch.
* Pixel-sized settings given at the reference's 800-px input (GISM's minimum box side, ROIAlign's
  canonical scale) scale with the student's ``min_size`` unless set (``DistillConfig``).
* Anchors, decoded boxes and GI selection are float32 under mixed precision (``gid_core.dense``).
* Loss sums are scaled to the paper's 256-channel FPN and 80 classes (``gid_core.losses``), so its
  loss weights carry over to other widths and class counts (``DistillConfig.normalize_losses``).
* Faster R-CNN (``DistillConfig.second_stage``, on by default): GISM runs on the RPN, then the GI
  candidates go through both box heads as shared proposals; their class-wise discrepancy joins the
  GI score and ``loss_response_rcnn_cls`` / ``_reg`` distil the box head (``gid_core.second_stage``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList

from .classmap import ClassMatch
from .config import DistillConfig
from .dense import DenseOutputs, FasterRCNNView, dense_view_for
from .gism import select_general_instances_batched
from .launch import get_world_size
from .losses import (
    REFERENCE_CHANNELS, feature_loss, feature_loss_from_sum, fitnet_loss, rcnn_response_loss, relation_loss_batched,
    response_loss,
)
from .roi import assign_levels, feature_levels, pool_instances, pooled_sum_of_squares
from .second_stage import box_head_outputs, class_discrepancy, top_k_per_image


def _global_count(count: Tensor) -> Tensor:
    """A loss normaliser summed over DDP ranks.

    DDP averages gradients over W ranks, so each rank's loss is scaled by W (see ``_distill_losses``)
    and divided by the global count: the step then equals one process with the whole batch."""
    count = count.detach().to(torch.float32)
    if get_world_size() > 1:
        count = count.clone()
        dist.all_reduce(count)
    return count


def _rois(boxes: Tensor, image_index: Tensor) -> Tensor:
    """(K, 5) rois [image index, x1, y1, x2, y2], as ROIAlign takes them."""
    return torch.cat([image_index[:, None].to(boxes.dtype), boxes], dim=1)


def _rows(inst: Tensor) -> Tensor:
    """(K, C, s, s) pooled features as (K, C s s) embeddings in their memory order: a view of the
    channels-last patches ``pool_instances`` returns (flattening them as (C, s, s) copied them).
    The relation loss reads only distances, which do not depend on the order of the dimensions."""
    if inst.is_contiguous(memory_format=torch.channels_last) and not inst.is_contiguous():
        return inst.permute(0, 2, 3, 1).flatten(1)
    return inst.flatten(1)


class GeneralInstances(NamedTuple):
    boxes: Tensor  # (K, 4) xyxy, all images of the batch
    scores: Tensor  # (K,) GI scores
    counts: Tensor  # (N,) GIs per image
    image_index: Tensor  # (K,) image of each GI


class GIDDistiller(nn.Module):
    """Wraps a frozen teacher and a trainable student; ``forward`` returns weighted losses."""

    def __init__(
        self, teacher: nn.Module, student: nn.Module, config: DistillConfig | None = None, *,
        classes: ClassMatch | None = None,
    ):
        """``classes``: how the dataset's (student's) classes match a teacher with other classes
        (``gid_core.classmap``); None when the teacher has the student's classes."""
        super().__init__()
        self.config = config or DistillConfig()
        self.view = dense_view_for(student)
        self.classes = None if classes is None or classes.identity else classes
        if type(teacher) is not type(student):
            raise ValueError(
                f"teacher ({type(teacher).__name__}) and student ({type(student).__name__}) must be "
                "the same detector family"
            )
        self.teacher = teacher
        self.student = student
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()
        t_ch, s_ch = teacher.backbone.out_channels, student.backbone.out_channels
        self.adapter = nn.Conv2d(s_ch, t_ch, kernel_size=3, padding=1)
        self._check_compatible()
        # Faster R-CNN's second stage (gid_core.second_stage): GISM keeps a larger pool for the box heads to rescore
        self.use_second_stage = self.config.second_stage and isinstance(self.view, FasterRCNNView)
        self.gism_top_k = self.config.top_k * (self.config.second_stage_pool if self.use_second_stage else 1)
        input_min_size = min(student.transform.min_size)
        self.gi_min_box_size = self.config.gi_min_box_size(input_min_size)
        self.roi_canonical_scale = self.config.roi_scale(input_min_size)
        self._anchor_cache: dict[tuple, list[Tensor]] = {}
        self.last_stats: dict[str, Tensor] = {}

    # -- module plumbing -----------------------------------------------------------------------
    def train(self, mode: bool = True) -> "GIDDistiller":
        super().train(mode)
        self.teacher.eval()  # always: BN running stats and dropout of the teacher stay fixed
        return self

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Student + adapter only: the frozen teacher is rebuilt from its own weights file."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        for key in [k for k in state if k.startswith(prefix + "teacher.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        teacher_state = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        return super().load_state_dict({**teacher_state, **state_dict}, strict=strict, assign=assign)

    def _check_compatible(self) -> None:
        gen_t = self.view.anchor_generator(self.teacher)
        gen_s = self.view.anchor_generator(self.student)
        if gen_t.sizes != gen_s.sizes or gen_t.aspect_ratios != gen_s.aspect_ratios:
            raise ValueError(
                f"teacher and student anchors differ ({gen_t.sizes} x {gen_t.aspect_ratios} vs "
                f"{gen_s.sizes} x {gen_s.aspect_ratios}): GID needs one-to-one dense predictions"
            )
        probe = torch.zeros(1, 3, 128, 128, device=next(self.student.parameters()).device)
        was_training = self.student.training
        self.student.eval()
        with torch.no_grad():
            shapes_t = [tuple(f.shape[-2:]) for f in self.teacher.backbone(probe).values()]
            shapes_s = [tuple(f.shape[-2:]) for f in self.student.backbone(probe).values()]
        self.student.train(was_training)
        if shapes_t != shapes_s:
            raise ValueError(f"teacher and student FPN levels differ: {shapes_t} vs {shapes_s}")

    def _anchors(self, images: ImageList, features: list[Tensor]) -> list[Tensor]:
        """Anchors depend only on shapes: computed once per (padded size, image sizes, device)."""
        key = (
            tuple(images.tensors.shape),
            tuple(images.image_sizes),
            tuple(tuple(f.shape[-2:]) for f in features),
            images.tensors.device,
        )
        anchors = self._anchor_cache.get(key)
        if anchors is None:
            if len(self._anchor_cache) > 64:  # many distinct sizes: don't grow without bound
                self._anchor_cache.clear()
            # The generator takes its dtype from the maps (float16 under autocast): hand it empty
            # float32 maps of the same sizes so anchors are exact.
            shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in features]
            anchors = self.view.anchor_generator(self.student)(images, shapes)
            self._anchor_cache[key] = anchors
        return anchors

    # -- the step ------------------------------------------------------------------------------
    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None) -> dict[str, Tensor]:
        """Weighted losses of one step. ``targets`` None: a batch of unlabeled images
        (``gid_core.unlabeled``): the distillation losses only, no ground-truth loss is computed."""
        if not self.training:
            raise RuntimeError("GIDDistiller computes training losses; call .student for inference")
        cfg = self.config
        image_list, targets = self.student.transform(images, targets)
        with torch.no_grad():
            t_out = self.view(self.teacher, image_list, self._anchors)
        s_out = self.view(self.student, image_list, self._anchors, targets)
        losses = {name: cfg.weight_gt * value for name, value in s_out.gt_losses.items()}
        if self.classes is not None and self.view.per_class:
            # the one place a teacher with other classes meets GISM and the response loss: both
            # read only the teacher's columns of the matched classes, beside the student's
            t_out, s_out = self.classes.restrict(t_out, s_out)
        if cfg.method == "gid":
            distill = self._distill_losses(t_out, s_out, image_list)
        else:
            distill = self._peer_losses(t_out, s_out)
        if targets is None:
            # Every student parameter stays in the graph at weight 0 (folded into the first
            # distillation loss), as on a labeled step: DDP expects each one's gradient, and SGD
            # decays and carries momentum for all of them whether one process or several ran it.
            first = next(iter(distill))
            distill[first] = distill[first] + sum(p.sum() for p in self.student.parameters() if p.requires_grad) * 0.0
        losses.update(distill)
        return losses

    def _peer_losses(self, t_out: DenseOutputs, s_out: DenseOutputs) -> dict[str, Tensor]:
        """The peer methods of ``DistillConfig.method``, without GI selection: ``fitnet`` imitates
        the teacher's whole FPN maps through the adapter (``loss_fitnet``, weight_feature);
        ``dense_response`` applies GID's response loss to every dense prediction
        (``loss_dense_response_cls`` / ``_reg``), each divided by the number of positions, so the
        GID weights keep their scale (``gid_core.losses``). Faster R-CNN: the RPN only."""
        cfg, world = self.config, get_world_size()
        losses: dict[str, Tensor] = {}
        if cfg.method == "fitnet":
            channels = REFERENCE_CHANNELS if cfg.normalize_losses else None
            s_maps = [self.adapter(f) for f in s_out.features]
            positions = s_maps[0].shape[0] * sum(f.shape[-2] * f.shape[-1] for f in s_maps)
            norm = _global_count(torch.tensor(positions, device=s_maps[0].device))
            loss = fitnet_loss(t_out.features, s_maps, normalizer=norm, reference_channels=channels)
            losses["loss_fitnet"] = cfg.weight_feature * world * loss
            return losses
        classes = self.view.response_classes(self.student) if cfg.normalize_losses else None
        mask = torch.ones(s_out.reg.shape[:2], dtype=torch.bool, device=s_out.reg.device)  # every prediction
        norm = _global_count(torch.tensor(mask.numel(), device=mask.device))
        cls, reg = response_loss(
            t_out.logits, s_out.logits, t_out.reg, s_out.reg, mask, normalizer=norm, num_classes=classes
        )
        losses["loss_dense_response_cls"] = cfg.weight_response_cls * world * cls
        losses["loss_dense_response_reg"] = cfg.weight_response_reg * world * reg
        # An unused adapter would leave DDP waiting for its gradient: keep it in the graph at 0.
        losses["loss_feature"] = sum(p.sum() for p in self.adapter.parameters()) * 0.0
        return losses

    def _distill_losses(self, t_out: DenseOutputs, s_out: DenseOutputs, image_list: ImageList) -> dict[str, Tensor]:
        cfg = self.config
        use_feature = cfg.use_feature and cfg.weight_feature > 0
        use_relation = cfg.use_relation and cfg.weight_relation > 0
        use_response = cfg.use_response and (cfg.weight_response_cls > 0 or cfg.weight_response_reg > 0)
        use_rcnn = cfg.use_response and (cfg.weight_response_rcnn_cls > 0 or cfg.weight_response_rcnn_reg > 0)
        gi = self.select_instances(t_out, s_out)
        if self.use_second_stage:
            gi, rcnn = self.second_stage(gi, t_out, s_out, image_list, grad=use_rcnn)
        n, world = len(gi.counts), get_world_size()
        losses: dict[str, Tensor] = {}
        # the paper's weights fit a 256-channel FPN and 80 classes: scale the sums to them (gid_core.losses)
        channels = REFERENCE_CHANNELS if cfg.normalize_losses else None
        classes = self.view.response_classes(self.student) if cfg.normalize_losses else None

        if use_feature or use_relation:
            levels = self._instance_levels(t_out, gi.boxes, image_list)
            if use_relation or cfg.adapter_on == "instances":
                t_inst, s_inst = self._instance_features(t_out, s_out, gi.boxes, gi.image_index, *levels)
            if use_feature:
                norm = _global_count(gi.counts.sum())
                if cfg.adapter_on == "maps":
                    loss = self._adapted_maps_loss(t_out, s_out, gi, levels, norm, channels)
                else:
                    loss = feature_loss(t_inst, self.adapter(s_inst), normalizer=norm, reference_channels=channels)
                losses["loss_feature"] = cfg.weight_feature * world * loss
            if use_relation:
                norm = _global_count((gi.counts >= 2).sum())
                loss = relation_loss_batched(_rows(t_inst), _rows(s_inst), gi.image_index, n, normalizer=norm)
                losses["loss_relation"] = cfg.weight_relation * world * loss
        if use_response:
            mask = self.response_mask(gi, s_out, image_list)
            norm = _global_count(mask.sum())
            cls, reg = response_loss(
                t_out.logits, s_out.logits, t_out.reg, s_out.reg, mask, normalizer=norm, num_classes=classes
            )
            losses["loss_response_cls"] = cfg.weight_response_cls * world * cls
            losses["loss_response_reg"] = cfg.weight_response_reg * world * reg
            self.last_stats["response_positives_per_image"] = mask.sum().detach().float() / max(n, 1)
        if self.use_second_stage and use_rcnn:
            norm = _global_count(gi.counts.sum())
            cls, reg = rcnn_response_loss(*rcnn, temperature=cfg.rcnn_temperature, normalizer=norm)
            losses["loss_response_rcnn_cls"] = cfg.weight_response_rcnn_cls * world * cls
            losses["loss_response_rcnn_reg"] = cfg.weight_response_rcnn_reg * world * reg

        if not use_feature:
            # An unused adapter would leave DDP waiting for its gradient: keep it in the graph at 0.
            losses["loss_feature"] = sum(p.sum() for p in self.adapter.parameters()) * 0.0
        self.last_stats["gi_per_image"] = gi.counts.float().mean().detach()
        self.last_stats["gi_score_mean"] = (
            gi.scores.float().mean().detach() if gi.scores.numel() else gi.boxes.new_zeros(())
        )
        return losses

    def select_instances(self, t_out: DenseOutputs, s_out: DenseOutputs) -> GeneralInstances:
        """GISM over the batch, flattened: boxes (K, 4), scores (K,), counts (N,), image_index (K,)."""
        cfg = self.config
        per_image = select_general_instances_batched(
            t_out.probs, t_out.boxes, s_out.probs.detach(), s_out.boxes,
            top_k=self.gism_top_k, nms_iou=cfg.nms_iou, pre_nms_top_n=cfg.pre_nms_top_n, min_size=self.gi_min_box_size,
        )
        boxes = torch.cat([b for b, _ in per_image])
        counts = torch.tensor([b.shape[0] for b, _ in per_image], device=boxes.device)
        image_index = torch.repeat_interleave(torch.arange(len(per_image), device=boxes.device), counts)
        return GeneralInstances(boxes, torch.cat([s for _, s in per_image]), counts, image_index)

    def second_stage(
        self, gi: GeneralInstances, t_out: DenseOutputs, s_out: DenseOutputs, image_list: ImageList, *, grad: bool
    ) -> tuple[GeneralInstances, tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Faster R-CNN: the GI candidates through both box heads as shared proposals; the class-wise
        discrepancy joins their GI score and the ``top_k`` best per image stay (``gid_core.second_stage``).

        Returns those GIs and the box heads' outputs on them, row for row: (t_logits, s_logits,
        t_deltas, s_deltas), (K, C+1) and (K, C+1, 4); the student's carry gradient if ``grad``."""
        proposals = (gi.boxes, gi.counts.tolist(), image_list.image_sizes)
        with torch.no_grad():
            t_logits, t_deltas = box_head_outputs(self.teacher, t_out.features, t_out.feature_names, *proposals)
        with torch.set_grad_enabled(grad):
            s_logits, s_deltas = box_head_outputs(self.student, s_out.features, s_out.feature_names, *proposals)
        if self.classes is not None:  # a teacher with other classes: its columns of the matched ones
            t_logits, s_logits = self.classes.restrict_softmax(t_logits, s_logits)
            t_deltas = t_deltas[:, [0, *self.classes.teacher_labels]]
            s_deltas = s_deltas[:, [0, *self.classes.student_labels]]
        scores = torch.maximum(gi.scores, class_discrepancy(t_logits, s_logits))
        keep = top_k_per_image(scores, gi.image_index, self.config.top_k)
        image_index = gi.image_index[keep]
        counts = torch.bincount(image_index, minlength=len(gi.counts))
        kept = GeneralInstances(gi.boxes[keep], scores[keep], counts, image_index)
        return kept, (t_logits[keep], s_logits[keep], t_deltas[keep], s_deltas[keep])

    def response_mask(self, gi: GeneralInstances, s_out: DenseOutputs, image_list: ImageList) -> Tensor:
        """(N, R) bool: the student's dense predictions its own matcher assigns to a GI box."""
        n, kmax = len(gi.counts), max(self.config.top_k, 1)
        # slot of each GI within its image, to scatter them into a padded (N, top_k, 4) batch
        slot = torch.arange(gi.boxes.shape[0], device=gi.boxes.device) - torch.repeat_interleave(
            torch.cumsum(gi.counts, 0) - gi.counts, gi.counts
        )
        padded = gi.boxes.new_zeros((n, kmax, 4))
        valid = torch.zeros((n, kmax), dtype=torch.bool, device=gi.boxes.device)
        padded[gi.image_index, slot] = gi.boxes
        valid[gi.image_index, slot] = True
        locations = [f.shape[-2] * f.shape[-1] for f in s_out.features]
        per_location = s_out.reg.shape[1] // sum(locations)  # anchors per location
        anchors = torch.stack(self._anchors(image_list, s_out.features))  # cached: no recompute
        return self.view.positive_mask(self.student, padded, valid, anchors, [c * per_location for c in locations])

    def _instance_levels(self, t_out: DenseOutputs, boxes: Tensor, image_list: ImageList) -> tuple[Tensor, list[int]]:
        """(K,) FPN level index of each GI box (the FPN paper's rule at ``roi_canonical_scale``) and
        the levels' strides."""
        levels = feature_levels(t_out.features, tuple(image_list.tensors.shape[-2:]))
        level_index = assign_levels(
            boxes, levels, canonical_scale=self.roi_canonical_scale, canonical_level=self.config.roi_canonical_level
        )
        return level_index, [2**k for k in levels]

    def _adapted_maps_loss(
        self, t_out: DenseOutputs, s_out: DenseOutputs, gi: GeneralInstances, levels: tuple[Tensor, list[int]],
        norm: Tensor, channels: int | None,
    ) -> Tensor:
        """The feature loss with ``adapter_on="maps"``: the adapter on each student FPN level that
        holds GIs, then the GIs' pooled differences with the teacher (pooling is linear: pooling
        adapter(S) - T once equals pooling both)."""
        cfg, (level_index, strides) = self.config, levels
        n, num_levels = len(gi.counts), len(strides)
        per_level = torch.bincount(level_index * n + gi.image_index, minlength=num_levels * n)
        per_level = per_level.view(num_levels, n).tolist()
        diff = [
            self.adapter(s) - t.to(s.dtype) if sum(counts) else t[:, :, :0, :0]  # (N, C, 0, 0): not pooled
            for s, t, counts in zip(s_out.features, t_out.features, per_level)
        ]
        sse = pooled_sum_of_squares(diff, _rois(gi.boxes, gi.image_index), level_index, strides, per_level,
                                    output_size=cfg.roi_output_size, sampling_ratio=cfg.roi_sampling_ratio)
        if gi.boxes.shape[0] == 0:  # the adapter stays in the graph (DDP)
            sse = sse + sum(p.sum() for p in self.adapter.parameters()) * 0.0
        return feature_loss_from_sum(sse, num=gi.boxes.shape[0], channels=t_out.features[0].shape[1],
                                     cells=cfg.roi_output_size**2, normalizer=norm, reference_channels=channels)

    def _instance_features(
        self, t_out: DenseOutputs, s_out: DenseOutputs, boxes: Tensor, image_index: Tensor, level_index: Tensor,
        strides: list[int],
    ) -> tuple[Tensor, Tensor]:
        """ROIAlign the GI boxes on teacher and student FPNs (levels from ``_instance_levels``):
        (K, C_t, s, s), (K, C_s, s, s)."""
        cfg = self.config
        rois = _rois(boxes, image_index)
        pool = dict(output_size=cfg.roi_output_size, sampling_ratio=cfg.roi_sampling_ratio)
        with torch.no_grad():
            t_inst = pool_instances(t_out.features, rois, level_index, strides, **pool)
        s_inst = pool_instances(s_out.features, rois, level_index, strides, **pool)
        return t_inst, s_inst
