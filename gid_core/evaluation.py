"""COCO bbox evaluation of a torchvision detector on a :class:`~gid_core.data.CocoDetectionDataset`.

:func:`evaluate_coco` runs the detector over a data loader, turns its outputs into COCO results
(contiguous labels back to COCO category ids; boxes back to the original image size, undoing the
dataset's resize through ``target["orig_size"]``; xyxy to xywh), gathers them from every DDP rank
and scores them with pycocotools' ``COCOeval`` on rank 0.

Metrics are percentages. A metric with nothing to measure (e.g. ``APl`` when no ground-truth box
is large, pycocotools' ``-1``) is ``None``; a model that detects nothing scores ``0.0``.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Iterable, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from gid_core.data import rescale_boxes
from gid_core.launch import get_rank, get_world_size

__all__ = ["METRIC_KEYS", "coco_bbox_metrics", "evaluate_coco", "summarize_metrics"]

METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _image_results(
    output: Mapping[str, torch.Tensor], target: Mapping[str, Any], input_hw, dataset, max_dets: int
) -> list[dict]:
    """One image's detector output as COCO result dicts in original-image coordinates."""
    boxes = output["boxes"].detach().float().cpu()  # (n, 4) xyxy in model-input coordinates
    scores = output["scores"].detach().float().cpu()  # (n,)
    labels = output["labels"].detach().cpu()  # (n,)
    # Label 0 is background (Faster R-CNN) or an unused slot (RetinaNet/FCOS): no category.
    keep = (labels >= 1) & (labels <= dataset.num_classes)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = torch.argsort(scores, descending=True)[:max_dets]
    boxes, scores, labels = boxes[order], scores[order], labels[order]
    orig_hw = tuple(int(v) for v in target.get("orig_size", input_hw))
    if tuple(input_hw) != orig_hw:
        boxes = rescale_boxes(boxes, input_hw, orig_hw)
    category_ids = dataset.label_to_category_id(labels)
    image_id = int(target["image_id"])
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    return [
        {"image_id": image_id, "category_id": int(c), "bbox": b, "score": float(s)}
        for b, s, c in zip(xywh, scores.tolist(), category_ids.tolist())
    ]


def _predict(
    model: nn.Module, data_loader: Iterable, dataset, device, max_dets: int
) -> dict[int, list[dict]]:
    """``{image_id: [COCO result, ...]}`` for every image the loader yields (also empty ones)."""
    results: dict[int, list[dict]] = {}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, targets in data_loader:
                images = [image.to(device, non_blocking=True) for image in images]
                outputs = model(images)
                for image, target, output in zip(images, targets, outputs):
                    dets = _image_results(output, target, tuple(image.shape[-2:]), dataset, max_dets)
                    results[int(target["image_id"])] = dets
    finally:
        model.train(was_training)
    return results


def _gather(results: dict[int, list[dict]]) -> dict[int, list[dict]] | None:
    """All ranks' results on rank 0 (None elsewhere).

    A DistributedSampler pads the last round with repeated images; keeping the first copy of each
    image id stops those repeats from counting as duplicate (false positive) detections.
    """
    if get_world_size() == 1:
        return results
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, results)
    if get_rank() != 0:
        return None
    merged: dict[int, list[dict]] = {}
    for part in gathered:
        for image_id, dets in part.items():
            merged.setdefault(image_id, dets)
    return merged


def _mean_valid(values: np.ndarray) -> float:
    """Mean over the defined entries (pycocotools marks undefined ones -1); -1 if none."""
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else -1.0


def _percent(values: np.ndarray) -> float | None:
    mean = _mean_valid(values)
    return None if mean == -1.0 else mean * 100.0


def _summary(E) -> str:
    """pycocotools' 12-line summary, using ``maxDets[-1]`` (pycocotools hard-codes 100 for AP)."""
    p = E.params
    lines = []
    rows = [(1, None, "all", p.maxDets[-1]), (1, 0.5, "all", p.maxDets[-1]), (1, 0.75, "all", p.maxDets[-1])]
    rows += [(1, None, a, p.maxDets[-1]) for a in ("small", "medium", "large")]
    rows += [(0, None, "all", m) for m in p.maxDets]
    rows += [(0, None, a, p.maxDets[-1]) for a in ("small", "medium", "large")]
    for ap, iou, area, max_det in rows:
        a, m = p.areaRngLbl.index(area), list(p.maxDets).index(max_det)
        s = E.eval["precision"][:, :, :, a, m] if ap else E.eval["recall"][:, :, a, m]
        if iou is not None:
            s = s[np.isclose(p.iouThrs, iou)]
        title, kind = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
        iou_text = f"{p.iouThrs[0]:0.2f}:{p.iouThrs[-1]:0.2f}" if iou is None else f"{iou:0.2f}"
        lines.append(
            f" {title:<18} {kind} @[ IoU={iou_text:<9} | area={area:>6s} | maxDets={max_det:>3d} ] = "
            f"{_mean_valid(s):0.3f}"
        )
    return "\n".join(lines)


def coco_bbox_metrics(
    coco_gt, detections: list[dict], image_ids: Iterable[int], *, max_dets: int = 100
) -> dict:
    """Scores COCO bbox ``detections`` against ``coco_gt`` on ``image_ids`` with COCOeval.

    Returns ``{"AP", "AP50", "AP75", "APs", "APm", "APl"}`` in percent (None where undefined),
    ``"per_category": {name: AP or None}``, ``"summary"`` (COCOeval's text), ``"num_images"`` and
    ``"num_detections"``. Only ``image_ids`` are scored, so a partial pass is not penalised for
    images it never saw.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    image_ids = sorted(set(int(i) for i in image_ids))
    names = {cat_id: cat["name"] for cat_id, cat in coco_gt.cats.items()}
    metrics: dict[str, Any] = {key: None for key in METRIC_KEYS}
    metrics["per_category"] = {names[c]: None for c in sorted(names)}
    metrics.update(summary="", num_images=len(image_ids), num_detections=len(detections))
    if not image_ids:
        return metrics
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        if detections:
            coco_dt = coco_gt.loadRes([dict(d) for d in detections])  # loadRes mutates its input
        else:
            # loadRes cannot take an empty list; an empty result set scores 0 where GT exists.
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        E = COCOeval(coco_gt, coco_dt, iouType="bbox")
        E.params.imgIds = image_ids
        E.params.maxDets = [1, 10, max_dets]
        E.evaluate()
        E.accumulate()
    precision = E.eval["precision"]  # (iou T, recall R, category K, area A, maxDets M)
    all_area = E.params.areaRngLbl.index("all")
    metrics["AP"] = _percent(precision[:, :, :, all_area, -1])
    metrics["AP50"] = _percent(precision[np.isclose(E.params.iouThrs, 0.5), :, :, all_area, -1])
    metrics["AP75"] = _percent(precision[np.isclose(E.params.iouThrs, 0.75), :, :, all_area, -1])
    for key, area in (("APs", "small"), ("APm", "medium"), ("APl", "large")):
        metrics[key] = _percent(precision[:, :, :, E.params.areaRngLbl.index(area), -1])
    for k, cat_id in enumerate(E.params.catIds):
        metrics["per_category"][names[cat_id]] = _percent(precision[:, :, k, all_area, -1])
    metrics["summary"] = _summary(E)
    return metrics


def evaluate_coco(
    model: nn.Module,
    data_loader: Iterable,
    dataset,
    device: torch.device | str,
    *,
    max_dets: int = 100,
) -> dict:
    """COCO bbox metrics of ``model`` over ``data_loader`` (batches from ``collate_detection``).

    ``model`` is a torchvision detector (pass the bare module, not its DDP wrapper: ranks may see
    different batch counts). It runs in eval mode under ``torch.inference_mode`` and its previous
    train/eval mode is restored. Under an initialised process group every rank must call this;
    results are gathered with ``all_gather_object`` (with NCCL, set the rank's CUDA device first),
    rank 0 returns the metrics (see :func:`coco_bbox_metrics`) and other ranks return ``{}``.
    ``dataset`` is the :class:`~gid_core.data.CocoDetectionDataset` the loader reads from.
    """
    if max_dets < 1:
        raise ValueError(f"max_dets must be >= 1, got {max_dets}")
    per_image = _gather(_predict(model, data_loader, dataset, device, max_dets))
    if per_image is None:
        return {}
    detections = [d for dets in per_image.values() for d in dets]
    return coco_bbox_metrics(dataset.coco, detections, per_image.keys(), max_dets=max_dets)


def summarize_metrics(metrics: Mapping[str, Any]) -> str:
    """One line: ``AP 41.2 | AP50 63.0 | AP75 44.1 | APs 20.3 | APm 45.0 | APl n/a``."""
    if not metrics:
        return "no metrics"

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{float(value):.1f}"

    return " | ".join(f"{key} {fmt(metrics.get(key))}" for key in METRIC_KEYS)
