"""Job specs: a complete request body for ``train``, ``distill`` or ``evaluate``, with the defaults
filled in, a description per field and the JSON Schema (``GET /v1/specs/{kind}``, ``gid init``).

Defaults fit the model asked for (``SpecChoices``): a torchvision weights name or a teacher model
gives the architecture, classes and input size; a dataset gives the classes; a smaller input scales
RetinaNet's and Faster R-CNN's anchors; ``max_iters`` scales warm-up and checkpoints. Every default
is kept within this server's job limits, so the body, once its placeholders are replaced, is
accepted as served. Placeholders stand only where the user must choose (datasets, teacher).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, get_args

from pydantic import BaseModel

from gid_core.config import Hyperparameters, ModelConfig
from gid_core.models import DEFAULT_ANCHOR_SIZES
from gid_core.weights import model_config_for
from service.core.config import Settings
from service.models import Dataset, Model
from service.schemas import EvaluateCreate, JobCreate

PLACEHOLDER = {"dataset": "<dataset id or name>", "model": "<model id or name>"}
ACCEPTED_KINDS = ("train", "distill", "evaluate")  # what POST /v1/jobs takes
REFERENCE_MIN_SIZE, REFERENCE_MAX_SIZE = 800, 1333  # torchvision's detection input size
SMALLEST_ANCHOR = 8

# Descriptions of the fields whose model has none (the engine's models are the home of the rest).
FIELD_NOTES = {
    "kind": "train: train a detector on a dataset; distill: train a student with GID from a teacher; "
            "evaluate: COCO AP of a model on a dataset",
    "student": "the detector being trained (for a train job, simply the model)",
    "student.arch": "detector: retinanet, fcos or fasterrcnn (torchvision's)",
    "student.backbone": "ResNet-18/34/50/101 or MobileNetV3-Large body under an FPN",
    "student.fpn_channels": "channels of every FPN level (and of the heads on them)",
    "teacher": "the trained detector a distillation learns from",
    "hyperparameters": "optimisation, schedule, data loading and bookkeeping",
    "hyperparameters.max_iters": "training iterations (optimizer steps of one global batch)",
    "hyperparameters.lr": "base learning rate (SGD), reached after warm-up",
    "hyperparameters.momentum": "SGD momentum",
    "hyperparameters.weight_decay": "L2 weight decay",
    "hyperparameters.warmup_iters": "iterations of linear learning-rate warm-up",
    "hyperparameters.warmup_factor": "learning rate at iteration 0, as a fraction of lr",
    "hyperparameters.schedule": "learning-rate schedule after warm-up: step, cosine or constant",
    "hyperparameters.gamma": "step schedule: lr factor at each milestone",
    "hyperparameters.flip_prob": "probability of a horizontal flip of each training image",
    "hyperparameters.num_workers": "data-loading processes per device",
    "hyperparameters.seed": "random seed (model init, data order, augmentation)",
    "hyperparameters.log_period": "iterations between logged metric points",
    "hyperparameters.checkpoint_period": "iterations between resumable checkpoints",
    "hyperparameters.keep_checkpoints": "newest checkpoints kept on disk",
    "hyperparameters.distill": "GID settings (distill jobs only), the paper's reference values",
    "hyperparameters.distill.nms_iou": "GISM: IoU of the NMS between general-instance candidates",
    "hyperparameters.distill.pre_nms_top_n": "GISM: best-scored candidates kept before the NMS",
    "hyperparameters.distill.roi_output_size": "side of the ROIAlign grid pooled per general instance",
    "hyperparameters.distill.roi_sampling_ratio": "ROIAlign samples per grid cell side (0: adaptive)",
    "hyperparameters.distill.roi_canonical_level": "FPN level a box of roi_canonical_scale pools from",
    "hyperparameters.distill.weight_gt": "weight of the detector's own (ground-truth) loss",
    "hyperparameters.distill.weight_feature": "weight of the feature-based distillation loss",
    "hyperparameters.distill.weight_relation": "weight of the relation-based distillation loss",
    "hyperparameters.distill.weight_response_cls": "weight of the response-based classification loss",
    "hyperparameters.distill.weight_response_reg": "weight of the response-based regression loss",
    "hyperparameters.distill.weight_response_rcnn_cls": "Faster R-CNN: weight of the second-stage "
                                                        "classification response loss",
    "hyperparameters.distill.weight_response_rcnn_reg": "Faster R-CNN: weight of the second-stage "
                                                        "box regression response loss",
    "hyperparameters.distill.use_feature": "ablation switch of the feature loss",
    "hyperparameters.distill.use_relation": "ablation switch of the relation loss",
    "hyperparameters.distill.use_response": "ablation switch of the response loss",
    "resources": "what the job runs on",
}


@dataclass
class SpecChoices:
    """What the caller chose (``GET /v1/specs/{kind}`` query); None leaves the default."""

    arch: str | None = None
    backbone: str | None = None
    weights: str | None = None  # a torchvision detector weights name
    min_size: int | None = None
    max_size: int | None = None
    max_iters: int | None = None
    num_classes: int | None = None
    train: Dataset | None = None
    val: Dataset | None = None
    teacher: Model | None = None


def build_spec(kind: str, choices: SpecChoices, settings: Settings) -> dict[str, Any]:
    """The ``SpecOut`` fields for ``kind``."""
    notes: list[str] = []
    if kind == "evaluate":
        body, placeholders = _evaluate_body(choices, settings)
        model: type[BaseModel] = EvaluateCreate
        notes.append("give model_id, or instead weights (a torchvision COCO detector, GET /v1/weights): its "
                     "classes meet the dataset's by name")
    else:
        body, placeholders = _training_body(kind, choices, settings, notes)
        model = JobCreate
    return {
        "kind": kind, "body": body, "placeholders": placeholders, "fields": field_docs(model, body),
        "schema": model.model_json_schema(), "accepted": kind in ACCEPTED_KINDS, "notes": notes,
    }


def _training_body(kind: str, c: SpecChoices, settings: Settings, notes: list[str]) -> tuple[dict, list[str]]:
    student = _student(kind, c, settings, notes)
    placeholders = []
    body: dict[str, Any] = {"kind": kind, "student": student}
    if kind == "distill":
        body["teacher"] = _teacher(c, placeholders)
    body["train_dataset"] = c.train.id if c.train else PLACEHOLDER["dataset"]
    body["val_dataset"] = c.val.id if c.val else (c.train.id if c.train else PLACEHOLDER["dataset"])
    placeholders += [f for f in ("train_dataset", "val_dataset") if body[f] == PLACEHOLDER["dataset"]]
    body["hyperparameters"] = _schedule(c, settings, notes)
    request = JobCreate.model_validate(body)  # the defaults filled in, and proof the body is valid
    return request.model_dump(mode="json", exclude={"student": {"weights"}}), placeholders


def _student(kind: str, c: SpecChoices, settings: Settings, notes: list[str]) -> dict[str, Any]:
    fields: dict[str, Any] = {"arch": "retinanet", "num_classes": 80}
    source = _model_source(c)
    if source is not None:
        what, config = source
        kept = ("arch", "num_classes", "min_size", "max_size", "anchor_sizes")
        if kind == "train":  # train the published detector's own layout; a student keeps its own backbone
            kept += ("backbone", "norm", "variant", "fpn_layout", "frozen_bn_eps")
        fields.update({k: v for k, v in config.model_dump().items() if k in kept})
        notes.append(f"arch, classes and input size from {what}")
    for name in ("arch", "backbone", "min_size", "max_size"):
        if getattr(c, name) is not None:
            fields[name] = getattr(c, name)
    if c.train is not None:
        fields["num_classes"] = len(c.train.categories)
        notes.append(f"num_classes from the {len(c.train.categories)} categories of dataset '{c.train.name}'")
    elif c.num_classes is not None:
        fields["num_classes"] = c.num_classes
    elif source is None:
        notes.append("num_classes 80 (COCO): set it to your dataset's category count, or pass train_dataset")
    _fit_input_size(fields, c, settings, notes)
    return fields


def _model_source(c: SpecChoices) -> tuple[str, ModelConfig] | None:
    if c.teacher is not None:
        return f"teacher model '{c.teacher.name}'", ModelConfig(**c.teacher.config)
    if c.weights is not None:
        return c.weights, model_config_for(c.weights)
    return None


def _fit_input_size(fields: dict[str, Any], c: SpecChoices, settings: Settings, notes: list[str]) -> None:
    """Input size within the server's limit; anchors scaled to it (one octave per FPN level)."""
    limit = settings.max_image_size
    min_size = min(fields.get("min_size", REFERENCE_MIN_SIZE), limit)
    default_max = math.ceil(min_size * REFERENCE_MAX_SIZE / REFERENCE_MIN_SIZE)
    max_size = min(fields.get("max_size", c.max_size or default_max), limit)
    # a max_size asked for stays as asked (ModelConfig refuses one below min_size)
    fields["min_size"], fields["max_size"] = min_size, max_size if c.max_size else max(min_size, max_size)
    own_anchors = fields["arch"] == "fcos" or fields.get("fpn_layout") == "torchvision_mobilenet"
    if fields.get("anchor_sizes") is None and not own_anchors and min_size < REFERENCE_MIN_SIZE:
        # torchvision's anchors (32..512) are for 800 px inputs; FCOS's sizes are its strides
        scaled = DEFAULT_ANCHOR_SIZES[fields["arch"]][0] * min_size / REFERENCE_MIN_SIZE
        smallest = max(SMALLEST_ANCHOR, 2 ** round(math.log2(scaled)))
        fields["anchor_sizes"] = [smallest * 2**level for level in range(len(DEFAULT_ANCHOR_SIZES["retinanet"]))]
        notes.append(f"anchor_sizes scaled to min_size {min_size}: {fields['anchor_sizes']}")


def _teacher(c: SpecChoices, placeholders: list[str]) -> dict[str, Any]:
    if c.teacher is not None:
        return {"model_id": c.teacher.id}
    if c.weights is not None:
        return {"weights": c.weights}
    placeholders.append("teacher.model_id")
    return {"model_id": PLACEHOLDER["model"]}


def _schedule(c: SpecChoices, settings: Settings, notes: list[str]) -> dict[str, Any]:
    """Engine defaults within this server's limits; warm-up and checkpoints scale with max_iters."""
    hp = Hyperparameters()
    max_iters = min(c.max_iters or hp.max_iters, settings.max_iters)
    fields: dict[str, Any] = {
        "max_iters": max_iters,
        "warmup_iters": min(hp.warmup_iters, max_iters // 10),
        "checkpoint_period": min(hp.checkpoint_period, max_iters),
        "log_period": min(hp.log_period, max_iters),
        "batch_size": min(hp.batch_size, settings.max_batch_per_device),
        "num_workers": min(hp.num_workers, settings.max_num_workers),
    }
    if max_iters != hp.max_iters:
        notes.append(f"max_iters {max_iters}: warmup_iters and checkpoint_period scaled to it")
    return fields


def _evaluate_body(c: SpecChoices, settings: Settings) -> tuple[dict[str, Any], list[str]]:
    body: dict[str, Any] = {"kind": "evaluate"}
    if c.weights is not None and c.teacher is None:
        body["weights"] = c.weights
    else:
        body["model_id"] = c.teacher.id if c.teacher else PLACEHOLDER["model"]
    body["dataset"] = (c.val or c.train).id if (c.val or c.train) else PLACEHOLDER["dataset"]
    source = _model_source(c)
    for name in ("min_size", "max_size"):  # the model's own input size, within this server's limit
        own = getattr(source[1], name) if source else None
        chosen = getattr(c, name) or (own if own is not None and own > settings.max_image_size else None)
        if chosen is not None:
            body[name] = min(chosen, settings.max_image_size)
    body["batch_size"] = min(EvaluateCreate.model_fields["batch_size"].default, settings.max_batch_per_device)
    placeholders = [f for f in ("model_id", "dataset") if body.get(f) in PLACEHOLDER.values()]
    request = EvaluateCreate.model_validate(body)
    return request.model_dump(mode="json", exclude_none=True), placeholders


# --------------------------------------------------------------------------- field descriptions


def field_docs(model: type[BaseModel], body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"a.b": {"description", "required"}}`` for every field of ``body`` (dotted paths), from the
    models' own descriptions, else ``FIELD_NOTES``, else the field's type."""
    docs: dict[str, dict[str, Any]] = {}
    _walk(model, body, "", docs)
    return docs


def _walk(model: type[BaseModel], body: dict[str, Any], prefix: str, docs: dict[str, dict[str, Any]]) -> None:
    for name, info in model.model_fields.items():
        if name not in body:
            continue
        path = f"{prefix}{name}"
        description = info.description or FIELD_NOTES.get(path) or _type_text(info.annotation)
        docs[path] = {"description": description, "required": info.is_required()}
        nested = _model_of(info.annotation)
        if nested is not None and isinstance(body[name], dict):
            _walk(nested, body[name], f"{path}.", docs)


def _model_of(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_text(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
