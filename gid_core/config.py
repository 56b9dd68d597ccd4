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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .errors import ConfigFileError, Loc, Problem

Arch = Literal["retinanet", "fcos", "fasterrcnn"]
Backbone = Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large"]
Norm = Literal["bn", "frozen_bn", "gn"]

ARCHS: tuple[str, ...] = Arch.__args__  # type: ignore[attr-defined]
BACKBONES: tuple[str, ...] = Backbone.__args__  # type: ignore[attr-defined]


class StrictModel(BaseModel):
    """The base of every config and request body: an unknown field is an error, never ignored."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(StrictModel):
    """Everything needed to rebuild a torchvision detector (recorded beside every export)."""

    arch: Arch
    backbone: Backbone = "resnet50"
    num_classes: int = Field(ge=1, le=10_000, description="foreground categories (no background)")
    fpn_channels: int = Field(256, ge=8, le=1024)
    norm: Norm = Field("bn", description="backbone normalisation: bn, frozen_bn or gn (32 groups)")
    min_size: int = Field(800, ge=32, le=4096, description="shorter image side after resize")
    max_size: int = Field(1333, ge=32, le=8192, description="longer image side cap after resize")
    anchor_sizes: list[int] | None = Field(
        None,
        description="base anchor size per FPN level (RetinaNet/Faster R-CNN) or the FCOS "
        "per-level scale; None keeps torchvision's defaults (32..512)",
    )
    weights: str | None = Field(
        None, description="local state_dict (.safetensors or .pt/.pth, loaded weights_only)"
    )

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
        if self.anchor_sizes is not None and any(s <= 0 for s in self.anchor_sizes):
            raise ValueError("anchor_sizes must be positive")
        return self


class DataConfig(StrictModel):
    """COCO-format datasets: an annotation JSON and the folder its ``file_name``s are relative to."""

    train_annotations: Path
    train_images: Path
    val_annotations: Path | None = None
    val_images: Path | None = None

    @model_validator(mode="after")
    def _val_pair(self) -> "DataConfig":
        if (self.val_annotations is None) != (self.val_images is None):
            raise ValueError("val_annotations and val_images must be given together")
        return self


class DistillConfig(StrictModel):
    """GID settings. Defaults are the authors' reference configuration (Dai et al., CVPR 2021)."""

    # GISM
    top_k: int = Field(10, ge=1, le=1000, description="general instances kept per image")
    nms_iou: float = Field(0.3, gt=0.0, le=1.0)
    pre_nms_top_n: int = Field(3000, ge=1)
    min_box_size: float = Field(0.0, ge=0.0, description="drop GI candidates with a shorter side")
    # Instance features
    roi_output_size: int = Field(10, ge=1, le=64)
    roi_sampling_ratio: int = Field(2, ge=0)
    roi_canonical_scale: float = Field(
        224.0, gt=0, description="FPN level mapping: a box of this side goes to canonical_level"
    )
    roi_canonical_level: int = Field(4, ge=0)
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


class Hyperparameters(StrictModel):
    """Optimisation, schedule, data and bookkeeping settings of one training run."""

    max_iters: int = Field(1000, ge=1)
    batch_size: int = Field(8, ge=1, description="global batch: split evenly across devices")
    lr: float = Field(0.01, gt=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_iters: int = Field(100, ge=0)
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
    seed: int = 0
    log_period: int = Field(10, ge=1)
    checkpoint_period: int = Field(500, ge=1)
    eval_period: int | None = Field(None, ge=1, description="evaluate every N iters (and at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="after")
    def _check_steps(self) -> "Hyperparameters":
        if any(not 0.0 < s < 1.0 for s in self.steps) or self.steps != sorted(self.steps):
            raise ValueError("steps must be increasing fractions in (0, 1)")
        return self


class JobConfig(StrictModel):
    """One training job, as the engine runs it."""

    kind: Literal["train", "distill"]
    student: ModelConfig
    teacher: ModelConfig | None = None
    data: DataConfig
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    devices: int = Field(1, ge=1, le=64, description="DDP processes (GPUs on CUDA)")

    @model_validator(mode="after")
    def _cross_field_rules(self) -> "JobConfig":
        problems = teacher_problems(self.kind, self.student, self.teacher)
        if self.teacher is not None:
            problems += class_problems(self.student.num_classes, teacher_classes=self.teacher.num_classes)
        problems += batch_split_problems(self.hyperparameters.batch_size, self.devices)
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
    seed: int = 0

    @model_validator(mode="after")
    def _check_counts(self) -> "SyntheticDatasetConfig":
        if self.max_objects < self.min_objects:
            raise ValueError("max_objects must be >= min_objects")
        return self


class EvalConfig(StrictModel):
    """``evaluate``: a checkpoint or export against a COCO-format dataset."""

    model: ModelConfig
    annotations: Path
    images: Path
    batch_size: int = Field(8, ge=1)
    devices: int = Field(1, ge=1)
    num_workers: int = Field(2, ge=0)


# --------------------------------------------------------------------------- cross-field rules
# Each rule is written once, here: JobConfig's validator, the engine's dataset checks and the
# service's job submission all report the problems these return. A problem's loc is a location in
# JobConfig (EvalConfig for an evaluation), which the service maps to its own request fields.

STUDENT_CLASSES: Loc = ("student", "num_classes")


def teacher_problems(kind: str, student: ModelConfig, teacher: ModelConfig | None) -> list[Problem]:
    """A distillation has a trained teacher of the student's arch; a training job has no teacher."""
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
    return problems


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
