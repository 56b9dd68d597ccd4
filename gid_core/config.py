"""The one job configuration shared by the CLI, the REST service, the worker and the engine.

Every model here is a ``StrictModel`` (pydantic, ``extra="forbid"``): a typo in a config file or an
API body is an error that names the field, never a silently ignored setting. The rules that relate
fields of different models (teacher and student, classes and datasets, batch and devices) are
written once, below the models, as functions returning ``gid_core.errors.Problem``s; the service
runs the same functions on a job request. ``load_config_file`` reads a YAML or JSON config file.

Layout::

    JobConfig
      kind: "train" | "distill"
      student: ModelConfig          # the detector being trained
      teacher: ModelConfig | None   # distill only; must carry ``weights``
      teacher_classes: TeacherClasses | None  # a teacher of other classes (gid_core.classmap)
      data: DataConfig              # COCO annotation files + image folders
      hyperparameters: Hyperparameters
        ... optimisation / schedule / checkpoint / eval settings ...
        distill: DistillConfig      # GID settings (ignored for kind="train")
      devices: int                  # DDP world size
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, ValidationError, ValidationInfo, field_validator,
    model_serializer, model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ConfigFileError, Loc, Problem

Arch = Literal["retinanet", "fcos", "fasterrcnn"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"]
Norm = Literal["bn", "frozen_bn", "gn"]
Variant = Literal["v1", "v2"]
FpnLayout = Literal["aligned", "torchvision_mobilenet"]
InitMode = Literal["strict", "backbone_and_box"]

ARCHS: tuple[str, ...] = Arch.__args__  # type: ignore[attr-defined]
BACKBONES: tuple[str, ...] = Backbone.__args__  # type: ignore[attr-defined]

# Bounds that hold for any run on any machine (a deployment narrows them: the service's "job
# limits" settings). Beyond them the engine fails or the value is meaningless.
FPN_LEVELS = 5  # every arch here: P3-P7 (RetinaNet, FCOS) or P2-P6 (Faster R-CNN)
MAX_IMAGE_SIDE = 8192
MAX_ITERATIONS = 2**31 - 1  # iteration numbers are stored as 32-bit integers (metric steps)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64 bits, and the engine adds the rank and the epoch
MAX_BATCH_SIZE = 4096
MAX_KEEP_CHECKPOINTS = 100
# torchvision's AnchorGenerator rounds half-sides: a size-1 anchor has zero height (an infinite box loss)
AnchorSize = Annotated[int, Field(ge=2, le=MAX_IMAGE_SIDE)]
Iterations = Annotated[int, Field(ge=1, le=MAX_ITERATIONS)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]


class StrictModel(BaseModel):
    """The base of every config and request body: an unknown field is an error, never ignored, and
    so is a NaN or infinite float (no training setting means anything non-finite)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class ModelConfig(StrictModel):
    """Everything needed to rebuild a torchvision detector (recorded beside every export)."""

    arch: Arch
    backbone: Backbone = "resnet50"
    num_classes: int = Field(ge=1, le=10_000, description="foreground categories (no background)")
    fpn_channels: int = Field(256, ge=8, le=1024)
    norm: Norm = Field("bn", description="backbone normalisation: bn, frozen_bn or gn (32 groups)")
    min_size: int = Field(800, ge=32, le=4096, description="shorter image side after resize")
    max_size: int = Field(1333, ge=32, le=MAX_IMAGE_SIDE, description="longer image side cap after resize")
    anchor_sizes: list[AnchorSize] | None = Field(
        None,
        description=f"base anchor size of each of the {FPN_LEVELS} FPN levels (RetinaNet/Faster R-CNN) or "
        "the FCOS per-level scale; None keeps torchvision's defaults (32..512)",
    )
    weights: str | None = Field(
        None,
        description="local state_dict (.safetensors or .pt/.pth, loaded weights_only), or a torchvision "
        "detector's weights by name: 'torchvision:<WeightsEnum>.<member>' (see gid_core.weights)",
    )
    # torchvision's recipes and pretrained starts (gid_core.weights.model_config_for fills these in
    # for a published detector; the defaults are the project's own v1 layout, trained from scratch)
    variant: Variant = Field(
        "v1",
        description="v1: the layout of torchvision's original builders; v2: retinanet_resnet50_fpn_v2 "
        "(GroupNorm head, P6 from C5, GIoU loss) or fasterrcnn_resnet50_fpn_v2 (BatchNorm FPN and box "
        "head, two-conv RPN head)",
    )
    fpn_layout: FpnLayout = Field(
        "aligned",
        description="aligned: FPN levels at ResNet strides for every backbone (P3-P7 / P2-P6); "
        "torchvision_mobilenet: fasterrcnn_mobilenet_v3_large_fpn's two stride-32 maps + pool, "
        "five anchor sizes per map",
    )
    frozen_bn_eps: float = Field(
        1e-5, ge=0.0, le=1.0,
        description="eps of FrozenBatchNorm2d layers (torchvision's COCO_V1 R50 RetinaNet and Faster R-CNN use 0)",
    )
    backbone_weights: str | None = Field(
        None,
        description="torchvision ImageNet weights of the backbone body, e.g. "
        "'torchvision:ResNet50_Weights.IMAGENET1K_V2' (from torch's hub cache); FPN and heads start "
        "fresh. Implies norm 'frozen_bn' unless norm is given",
    )
    trainable_backbone_layers: int | None = Field(
        None, ge=0, le=6,
        description="backbone stages left trainable, counted from the top (ResNet 0-5, MobileNetV3 0-6); "
        "None: torchvision's 3 with backbone_weights, else all",
    )
    init_mode: InitMode = Field(
        "strict",
        description="strict: weights must fit every tensor; backbone_and_box: keep backbone, FPN and the "
        "box branch where shapes fit, start a fresh classification head (weights of another class count)",
    )

    @model_validator(mode="before")
    @classmethod
    def _pretrained_backbone_norm(cls, data: Any) -> Any:
        # torchvision's recipe: a pretrained backbone keeps its ImageNet BN statistics frozen
        if isinstance(data, dict) and data.get("backbone_weights") and "norm" not in data:
            data = {**data, "norm": "frozen_bn"}
        return data

    @field_validator("variant")
    @classmethod
    def _variant_exists(cls, variant: str, info: ValidationInfo) -> str:
        arch, fpn = info.data.get("arch"), info.data.get("fpn_channels")
        if variant == "v2" and arch == "fcos":
            raise ValueError("torchvision has no v2 recipe for fcos")
        if variant == "v2" and arch == "retinanet" and fpn is not None and fpn % 32:
            raise ValueError(f"retinanet v2's GroupNorm head needs fpn_channels ({fpn}) to be a multiple of 32")
        return variant

    @field_validator("fpn_layout")
    @classmethod
    def _layout_fits(cls, layout: str, info: ValidationInfo) -> str:
        d = info.data
        if layout == "torchvision_mobilenet" and (
            d.get("arch") != "fasterrcnn" or d.get("backbone") != "mobilenet_v3_large"
            or d.get("variant") != "v1" or d.get("anchor_sizes") is not None
        ):
            raise ValueError(
                "torchvision_mobilenet is fasterrcnn_mobilenet_v3_large_fpn's layout: arch fasterrcnn, "
                "backbone mobilenet_v3_large, variant v1 and its own anchors (anchor_sizes None)"
            )
        return layout

    @field_validator("backbone_weights")
    @classmethod
    def _backbone_weights_fit(cls, name: str | None, info: ValidationInfo) -> str | None:
        if name is not None and not name.startswith("torchvision:"):
            # names only: they resolve inside torch's hub cache, never to an arbitrary path
            raise ValueError("expected a torchvision weights name, e.g. 'torchvision:ResNet50_Weights.IMAGENET1K_V2'")
        if name is not None and info.data.get("weights") is not None:
            raise ValueError("give weights (a whole detector) or backbone_weights, not both")
        if name is not None and info.data.get("norm") == "gn":
            raise ValueError("ImageNet backbones are BatchNorm networks: use norm 'frozen_bn' or 'bn'")
        return name

    @field_validator("trainable_backbone_layers")
    @classmethod
    def _stages_exist(cls, layers: int | None, info: ValidationInfo) -> int | None:
        backbone = info.data.get("backbone")
        if layers is not None and layers > 5 and backbone != "mobilenet_v3_large":
            raise ValueError(f"{backbone} has 5 stages: trainable_backbone_layers must be 0-5")
        return layers

    @field_validator("init_mode")
    @classmethod
    def _init_needs_weights(cls, mode: str, info: ValidationInfo) -> str:
        if mode != "strict" and info.data.get("weights") is None:
            raise ValueError(f"init_mode {mode!r} initialises from weights: set weights")
        return mode

    @field_validator("anchor_sizes")
    @classmethod
    def _one_anchor_size_per_level(cls, sizes: list[int] | None) -> list[int] | None:
        # torchvision's AnchorGenerator needs one size per feature map, or fails in the first step
        if sizes is not None and len(sizes) != FPN_LEVELS:
            raise ValueError(f"one size per FPN level: the detectors have {FPN_LEVELS} FPN levels, got {len(sizes)} sizes")
        return sizes

    @model_validator(mode="after")
    def _check_sizes(self) -> "ModelConfig":
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        if self.norm == "gn" and self.fpn_channels % 32:
            # FCOS and the GN backbone use 32 groups.
            raise ValueError(f"fpn_channels ({self.fpn_channels}) must be a multiple of 32 with norm 'gn'")
        if self.arch == "fcos" and (self.fpn_channels % 32 or self.fpn_channels < 64):
            # torchvision's FCOS head hard-codes GroupNorm(32, C); one channel per group breaks on
            # the 1x1 P7 map of small images.
            raise ValueError(f"fpn_channels ({self.fpn_channels}) must be a multiple of 32 and >= 64 for fcos")
        return self


class DataConfig(StrictModel):
    """COCO-format datasets: an annotation JSON and the folder its ``file_name``s are relative to."""

    train_annotations: Path
    train_images: Path
    val_annotations: Path | None = None
    val_images: Path | None = None
    # Distillation on unlabeled images (issue #12, gid_core.unlabeled): GISM needs no ground truth
    unlabeled_images: Path | None = Field(
        None, description="distill only: a folder of images without labels; their batches get the GID losses only",
    )
    unlabeled_annotations: Path | None = Field(
        None, description="a COCO file listing the images of unlabeled_images (annotations and categories, if "
        "any, are ignored); None: every image file in the folder",
    )

    @model_validator(mode="after")
    def _val_pair(self) -> "DataConfig":
        if (self.val_annotations is None) != (self.val_images is None):
            raise ValueError("val_annotations and val_images must be given together")
        if self.unlabeled_annotations is not None and self.unlabeled_images is None:
            raise ValueError("unlabeled_annotations needs unlabeled_images (the folder its file_names are in)")
        return self


REFERENCE_MIN_SIZE = 800  # the input size GID's reference settings are given at


class DistillConfig(StrictModel):
    """GID settings. Defaults are the authors' reference configuration (Dai et al., CVPR 2021)."""

    # Peer methods for comparison (issue #12): same teacher, adapter, weights and normaliser rules
    method: Literal["gid", "fitnet", "dense_response"] = Field(
        "gid",
        description="gid: the GI-selected feature, relation and response losses; fitnet: imitate the "
        "teacher's whole FPN maps through the adapter (L2, weight_feature); dense_response: the response "
        "loss on every dense prediction, no GI selection (weight_response_cls / _reg)",
    )
    # GISM
    top_k: int = Field(10, ge=1, le=1000, description="general instances kept per image")
    nms_iou: float = Field(0.3, gt=0.0, le=1.0)
    pre_nms_top_n: int = Field(3000, ge=1, le=100_000)
    min_box_size: float | None = Field(
        None, ge=0.0,
        description="drop GI candidates with a shorter side (px of the resized input); None: the "
        "reference's 10 px at 800 px, scaled with the student's min_size. Degenerate boxes are always dropped",
    )
    # Instance features
    roi_output_size: int = Field(10, ge=1, le=64)
    # roi_align takes ratio**2 samples per output cell (0: adaptive)
    roi_sampling_ratio: int = Field(2, ge=0, le=16)
    roi_canonical_scale: float | None = Field(
        None, gt=0,
        description="FPN level mapping: a box of this side goes to canonical_level; None: 224 at "
        "800 px, scaled with the student's min_size (224 * min_size / 800)",
    )
    roi_canonical_level: int = Field(4, ge=0, le=16)  # levels are clamped to the pyramid
    adapter_on: Literal["instances", "maps"] = Field(
        "instances",
        description="where the feature loss's 3x3 adapter runs. instances: on each GI's pooled student "
        "patch (pool, then adapt); maps: on the student's FPN maps, whose GI patches are then pooled "
        "(adapt, then pool, as a public detectron2 reproduction of GID does): its cost grows with the "
        "maps' area, not with top_k, so it is the cheaper one for small inputs or many GIs",
    )
    # Loss weights (0 switches a loss off)
    weight_gt: float = Field(1.0, ge=0.0)
    weight_feature: float = Field(5e-4, ge=0.0)
    weight_relation: float = Field(40.0, ge=0.0)
    weight_response_cls: float = Field(0.1, ge=0.0)
    weight_response_reg: float = Field(1.0, ge=0.0)
    # Ablation switches (independent of the weights so a config can keep its weights)
    use_feature: bool = True
    use_relation: bool = True
    use_response: bool = True
    normalize_losses: bool = Field(
        True,
        description="scale the feature loss to a 256-channel FPN and the response BCE to 80 classes "
        "(gid_core.losses), so the paper's weights fit any FPN width and class count; false: raw sums",
    )
    # Faster R-CNN's second stage (gid_core.second_stage); ignored by one-stage detectors
    second_stage: bool = Field(
        True,
        description="Faster R-CNN: GI boxes go through both box heads as shared proposals; their "
        "class-wise discrepancy joins the GI score and a response loss distils class logits and box deltas",
    )
    second_stage_pool: int = Field(
        2, ge=1, le=16,
        description="GISM keeps pool * top_k RPN candidates per image; the box heads rescore them and "
        "the top_k best become the general instances",
    )
    rcnn_temperature: float = Field(
        1.0, gt=0.0, le=100.0, description="softmax temperature of the second-stage class loss"
    )
    weight_response_rcnn_cls: float = Field(1.0, ge=0.0)
    weight_response_rcnn_reg: float = Field(1.0, ge=0.0)

    def gi_min_box_size(self, input_min_size: int) -> float:
        """``min_box_size``, or the reference's 10 px at 800 px scaled to the student's input."""
        return self.min_box_size if self.min_box_size is not None else 10.0 * input_min_size / REFERENCE_MIN_SIZE

    def roi_scale(self, input_min_size: int) -> float:
        """``roi_canonical_scale``, or ROIAlign's 224 px at 800 px scaled to the student's input, so
        a GI pools from the same FPN level whatever the input size."""
        if self.roi_canonical_scale is not None:
            return self.roi_canonical_scale
        return 224.0 * input_min_size / REFERENCE_MIN_SIZE


class Hyperparameters(StrictModel):
    """Optimisation, schedule, data and bookkeeping settings of one training run."""

    max_iters: Iterations = 1000
    batch_size: int = Field(8, ge=1, le=MAX_BATCH_SIZE, description="global batch: split evenly across devices")
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_iters: int = Field(100, ge=0, le=MAX_ITERATIONS)
    warmup_factor: float = Field(0.001, gt=0.0, le=1.0)
    schedule: Literal["step", "cosine", "constant"] = "step"
    steps: list[float] = Field(
        default_factory=lambda: [2 / 3, 8 / 9],
        description="step schedule milestones as fractions of max_iters",
    )
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    grad_clip: float | None = Field(None, gt=0.0, description="max global grad norm")
    amp: bool = Field(True, description="mixed precision; only takes effect on CUDA")
    sync_batchnorm: bool = Field(True, description="SyncBatchNorm when DDP runs on CUDA")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    num_workers: int = Field(2, ge=0, le=64)
    seed: Seed = 0
    log_period: Iterations = 10
    checkpoint_period: Iterations = 500
    eval_period: Iterations | None = Field(None, description="evaluate every N iters (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, le=MAX_KEEP_CHECKPOINTS)
    unlabeled_ratio: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="with unlabeled images: the fraction of steps that take an unlabeled batch (GID losses "
        "only); the rest take labeled batches (GT + GID losses). Ignored without unlabeled images",
    )
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _check_steps(self) -> "Hyperparameters":
        if any(not 0.0 < s < 1.0 for s in self.steps) or self.steps != sorted(self.steps):
            raise ValueError("steps must be increasing fractions in (0, 1)")
        return self


class TeacherClasses(StrictModel):
    """How a distillation teacher's classes meet the dataset's (``gid_core.classmap``): by name,
    unless ``class_map`` says otherwise. The student always has the dataset's classes."""

    categories: list[str] | None = Field(
        None, max_length=10_000,
        description="the teacher's category names in label order; None: those of a torchvision weights "
        "name, or else the dataset's (then the teacher must have the dataset's classes, in its order)",
    )
    class_map: dict[str, str] | None = Field(
        None, max_length=10_000, description="dataset class name -> teacher class name, where names differ"
    )
    allow_missing_classes: bool = Field(
        False, description="a dataset class the teacher lacks is distilled by features and relations only "
        "(else it is an error)",
    )


class JobConfig(StrictModel):
    """One training job, as the engine runs it."""

    kind: Literal["train", "distill"]
    student: ModelConfig
    teacher: ModelConfig | None = None
    teacher_classes: TeacherClasses | None = None
    data: DataConfig
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    devices: int = Field(1, ge=1, le=64, description="DDP processes (GPUs on CUDA)")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "JobConfig":
        problems = teacher_problems(self.kind, self.student, self.teacher)
        if self.teacher_classes is not None and self.kind != "distill":
            problems.append(Problem(("teacher_classes",), "only allowed when kind is 'distill'"))
        if self.teacher is not None and not teacher_categories_known(self.teacher, self.teacher_classes):
            # a teacher of unknown categories must have the student's; known ones match by name
            problems += class_problems(self.student.num_classes, teacher_classes=self.teacher.num_classes)
        problems += batch_split_problems(self.hyperparameters.batch_size, self.devices)
        problems += unlabeled_problems(self.kind, self.data.unlabeled_images is not None)
        if problems:
            raise _validation_error(self, problems)
        return self


class SyntheticDatasetConfig(StrictModel):
    """The deterministic synthetic COCO-format generator (``make-dataset``)."""

    output_dir: Path
    num_train: int = Field(256, ge=1)
    num_val: int = Field(64, ge=1)
    image_size: int = Field(128, ge=32, le=2048)
    num_classes: int = Field(8, ge=1, le=10)
    min_objects: int = Field(1, ge=0)
    max_objects: int = Field(10, ge=1)
    seed: Seed = 0
    # Scene difficulty (issue #12: the demo's easier task). The defaults are the original scenes,
    # and at their defaults these fields are left out of the dump (below), so a config that does
    # not set them keeps its hash: the benchmark caches are keyed on it.
    object_scale: tuple[float, float] | None = Field(
        None, description="[min, max] of sqrt(box area) / image side for every object, drawn uniformly; "
        "null: the three COCO size buckets (small, medium, large)",
    )
    clutter: bool = Field(True, description="1-4 unannotated distractor shapes per image")
    photo_background: bool = Field(
        True, description="muted crops of photographs behind the objects; false: a flat dark grey",
    )

    @model_validator(mode="after")
    def _check_counts(self) -> "SyntheticDatasetConfig":
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        return self

    @field_validator("object_scale")
    @classmethod
    def _check_object_scale(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        if value is not None and not 0.05 <= value[0] <= value[1] <= 0.9:
            raise ValueError("must be [min, max] with 0.05 <= min <= max <= 0.9")
        return value

    @model_serializer(mode="wrap")
    def _drop_default_scene(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for name in _SCENE_FIELDS:
            if getattr(self, name) == type(self).model_fields[name].default:
                data.pop(name, None)
        return data


_SCENE_FIELDS = ("object_scale", "clutter", "photo_background")


class EvalConfig(StrictModel):
    """``evaluate``: a checkpoint or export against a COCO-format dataset."""

    model: ModelConfig
    annotations: Path
    images: Path
    batch_size: int = Field(8, ge=1)
    devices: int = Field(1, ge=1)
    num_workers: int = Field(2, ge=0)
    # A model of other classes (a torchvision COCO detector): its detections are relabelled to the
    # dataset's classes by name, as a distillation matches a teacher's (gid_core.classmap).
    model_classes: TeacherClasses | None = Field(
        None, description="the model's categories and class_map, where they differ from the dataset's; "
        "a torchvision weights name's categories are known without it",
    )


# --------------------------------------------------------------------------- cross-field rules
# Each rule is written once, here: JobConfig's validator, the engine's dataset checks and the
# service's job submission all report the problems these return. A problem's loc is a location in
# JobConfig (EvalConfig for an evaluation), which the service maps to its own request fields.

STUDENT_CLASSES: Loc = ("student", "num_classes")


def teacher_problems(kind: str, student: ModelConfig, teacher: ModelConfig | None) -> list[Problem]:
    """A distillation has a trained teacher of the student's arch and input size, loaded whole; a
    training job has no teacher."""
    if kind != "distill":
        return [] if teacher is None else [Problem(("teacher",), "only allowed when kind is 'distill'")]
    if teacher is None:
        return [Problem(("teacher",), "required when kind is 'distill'", "missing")]
    problems = []
    if teacher.weights is None:
        problems.append(Problem(("teacher", "weights"), "a distillation teacher must be trained", "missing"))
    if teacher.arch != student.arch:
        problems.append(Problem(
            ("teacher", "arch"),
            f"teacher.arch ({teacher.arch}) != student.arch ({student.arch}): "
            "GID matches dense predictions one to one",
        ))
    for name in ("min_size", "max_size"):
        t, s = getattr(teacher, name), getattr(student, name)
        if t != s:  # refused rather than silently ignored
            problems.append(Problem(
                ("teacher", name),
                f"teacher.{name} ({t}) != student.{name} ({s}): the teacher sees the student's resized "
                f"images, so set the teacher's {name} to the student's",
            ))
    if teacher.init_mode != "strict":
        problems.append(Problem(("teacher", "init_mode"), "a teacher loads all of its trained weights: use 'strict'"))
    return problems


def teacher_categories_known(teacher: ModelConfig, classes: TeacherClasses | None) -> bool:
    """The teacher's category names are known (given, or from its torchvision weights name), so its
    classes are matched to the dataset's by name (``gid_core.classmap``) rather than by count."""
    given = classes is not None and classes.categories is not None
    return given or (teacher.weights or "").startswith("torchvision:")


def dataset_class_problems(
    num_classes: int, categories: list[Any], *, loc: Loc, dataset: str
) -> list[Problem]:
    """A detector with ``num_classes`` (the field at ``loc``) fits a dataset with these categories."""
    if len(categories) == num_classes:
        return []
    field = ".".join(map(str, loc))
    message = f"{field} ({num_classes}) != the {len(categories)} categories of {dataset}"
    return [Problem(loc, message, "class_mismatch")]


def class_problems(
    student_classes: int,
    *,
    teacher_classes: int | None = None,
    teacher_categories: list[Any] | None = None,
    train_categories: list[Any] | None = None,
    val_categories: list[Any] | None = None,
) -> list[Problem]:
    """Teacher, student and datasets agree on the classes (None: not known to the caller).
    Categories are lists in label order, compared as given (names, or ``{"id", "name"}`` dicts)."""
    problems = []
    if train_categories is not None:
        problems += dataset_class_problems(
            student_classes, train_categories, loc=STUDENT_CLASSES, dataset="the train set"
        )
        if val_categories is not None and val_categories != train_categories:
            problems.append(Problem(
                ("data", "val_annotations"),
                f"the val set's categories {val_categories} differ from the train set's {train_categories}",
                "class_mismatch",
            ))
    if teacher_classes is not None and teacher_classes != student_classes:
        problems.append(Problem(
            ("teacher", "num_classes"),
            f"teacher.num_classes ({teacher_classes}) != student.num_classes ({student_classes})",
            "class_mismatch",
        ))
    elif None not in (teacher_categories, train_categories) and teacher_categories != train_categories:
        problems.append(Problem(
            ("teacher", "weights"),  # the categories the teacher's weights were trained on
            f"the teacher's categories {teacher_categories} differ from the train set's {train_categories}",
            "class_mismatch",
        ))
    return problems


def batch_split_problems(batch_size: int, devices: int) -> list[Problem]:
    """The global batch splits evenly across the DDP processes."""
    if batch_size % devices == 0:
        return []
    message = f"batch_size ({batch_size}) must be divisible by devices ({devices})"
    return [Problem(("hyperparameters", "batch_size"), message)]


def unlabeled_problems(kind: str, has_unlabeled: bool) -> list[Problem]:
    """Unlabeled images feed the GID losses only: a training job has nothing to give them."""
    if has_unlabeled and kind != "distill":
        return [Problem(("data", "unlabeled_images"), "only allowed when kind is 'distill' (unlabeled images "
                        "get the distillation losses only)")]
    return []


def _validation_error(model: BaseModel, problems: list[Problem]) -> ValidationError:
    """pydantic's error for ``problems``, each at its own loc (a validator's ``ValueError`` would
    sit at the model's loc, and the field would survive only in the message text)."""
    return ValidationError.from_exception_data(type(model).__name__, [
        InitErrorDetails(
            type=PydanticCustomError(p.code, "{message}", {"message": p.message}),
            loc=p.loc,
            input=functools.reduce(getattr, p.loc, model),
        )
        for p in problems
    ])


# --------------------------------------------------------------------------- config files


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML (``.yaml``/``.yml``) or JSON (``.json``) config file; any other suffix
    is read as YAML, which also accepts JSON. Raises ``ConfigFileError`` naming the file and what is
    wrong with it: missing, unreadable, bad syntax, or not a mapping."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(path, f"cannot read config file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = getattr(e, "strerror", None) or e
        raise ConfigFileError(path, f"cannot read config file {path}: {reason}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigFileError(path, f"config file {path} is not valid JSON: {e}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            syntax = "YAML" if path.suffix.lower() in (".yaml", ".yml") else "YAML or JSON"
            raise ConfigFileError(path, f"config file {path} is not valid {syntax}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(path, f"config file {path}: expected a mapping, got {type(data).__name__}")
    return data
