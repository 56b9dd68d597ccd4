"""Request and response bodies of the REST API (pydantic).

Job requests reuse the engine's own ``ModelConfig`` and ``Hyperparameters`` from
``gid_core.config``, so an unknown arch, backbone or hyperparameter is refused by the same models the
engine runs with. Weights are never given as paths over the API: models are referenced by id,
torchvision's published weights by name (``TeacherSpec.weights``, ``ModelConfig.backbone_weights``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AnyHttpUrl,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    UrlConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from gid_core.config import Hyperparameters, ModelConfig, StrictModel

Name = Field(min_length=1, max_length=200)


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------
# Error bodies (documented per route through ``service.api.responses``)


class FieldErrorOut(BaseModel):
    """One problem with a request field: FastAPI's validation-error shape (``service.errors``)."""

    model_config = ConfigDict(extra="allow")  # pydantic adds "input" and "ctx"

    loc: list[str | int]
    msg: str
    type: str


class ErrorOut(BaseModel):
    """Every 4xx body: a message, or the list of request fields at fault."""

    detail: str | list[FieldErrorOut]


# --------------------------------------------------------------------------------------------
# Requests


class ModelSpec(ModelConfig):
    """A ``ModelConfig`` whose weights the service fills in (from an uploaded model)."""

    weights: SkipJsonSchema[str | None] = None

    @field_validator("weights", mode="before")
    @classmethod
    def _no_paths(cls, value: Any) -> None:
        if value is not None:
            raise ValueError("not accepted over the API: upload the checkpoint and refer to it by model id")
        return None

    def to_model_config(self, weights: str | None = None) -> ModelConfig:
        fields = self.model_dump(exclude={"weights", "init_model_id"})
        return ModelConfig(**fields, weights=weights)


class StudentSpec(ModelSpec):
    init_model_id: str | None = Field(None, description="start from this model's weights")


class TeacherSpec(StrictModel):
    """The teacher of a distillation: an uploaded or trained model, or torchvision's published COCO
    detector by weights name (exactly one of them)."""

    model_id: str | None = Field(None, description="a trained model (uploaded, or the output of a train job)")
    weights: str | None = Field(
        None,
        description="torchvision's COCO detector by weights name, e.g. "
        "'torchvision:RetinaNet_ResNet50_FPN_Weights.COCO_V1' (see GET /v1/weights): its architecture and "
        "categories come from the weights; it sees the student's resized images (min_size, max_size)",
    )
    # A teacher of other classes (gid_core.classmap): its classes meet the dataset's by name
    class_map: dict[str, str] | None = Field(
        None, max_length=10_000,
        description="dataset class name -> teacher class name, where the names differ; the rest match by "
        "name (the teacher's categories: its weights', or the uploaded model's)",
    )
    allow_missing_classes: bool = Field(
        False,
        description="distil a dataset class the teacher lacks by features and relations only (else a 422)",
    )

    @model_validator(mode="after")
    def _one_reference(self) -> "TeacherSpec":
        if (self.model_id is None) == (self.weights is None):
            raise ValueError("give exactly one of model_id and weights")
        return self


class Resources(StrictModel):
    """``nodes`` worker nodes with ``devices`` DDP processes each (GPUs on CUDA): a world of
    ``nodes * devices`` ranks; ``hyperparameters.batch_size`` is the global batch across all of them."""

    nodes: int = Field(1, ge=1, le=64, description="worker nodes the job spans (torch elastic rendezvous)")
    devices: int = Field(1, ge=1, le=64, description="DDP processes per node (GPUs on CUDA)")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices


# A job label: short, and safe in a URL query and a shell without quoting.
Tag = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:=+-]*$")]
MAX_TAGS = 20
EXPERIMENT_TAG_PREFIX = "experiment:"  # each job of an experiment gets experiment:<its id's first 8>


# An http(s) URL with a host; stored as text (the model dumps it in JSON mode).
WebhookUrl = Annotated[AnyHttpUrl, UrlConstraints(max_length=2000, allowed_schemes=["http", "https"])]


class JobUpdate(StrictModel):
    """``PATCH /v1/jobs/{id}``: the fields given replace the job's (in any state); others stay."""

    name: str | None = Field(None, min_length=1, max_length=200, description="a name to find the job by; null clears it")
    tags: list[Tag] | None = Field(
        None, max_length=MAX_TAGS, description="the job's whole tag list (replaces it; [] or null clears it)"
    )

    @field_validator("tags")
    @classmethod
    def _distinct_tags(cls, tags: list[str] | None) -> list[str] | None:
        return None if tags is None else JobCreate._distinct_tags(tags)


class JobCreate(StrictModel):
    kind: Literal["train", "distill"]
    name: str | None = Field(None, min_length=1, max_length=200, description="a name to find the job by")
    tags: list[Tag] = Field(
        default_factory=list, max_length=MAX_TAGS,
        description="labels to filter jobs by (GET /v1/jobs?tag=): letters, digits and _.:=+- , up to 64 characters",
    )
    student: StudentSpec
    teacher: TeacherSpec | None = None
    train_dataset: str = Field(description="dataset id, unique name or unique id prefix")
    val_dataset: str | None = Field(
        None, description="dataset id, unique name or unique id prefix; evaluated during and after training"
    )
    unlabeled_dataset: str | None = Field(
        None, description="distill only: a dataset whose images (labels, if any, unused) get the GID losses "
        "alone, in hyperparameters.unlabeled_ratio of the steps; id, unique name or unique id prefix",
    )

    @field_validator("tags")
    @classmethod
    def _distinct_tags(cls, tags: list[str]) -> list[str]:
        if len(set(tags)) != len(tags):
            raise ValueError("tags must be distinct")
        return tags
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    resources: Resources = Field(default_factory=Resources)
    webhook_url: WebhookUrl | None = Field(
        None,
        description="called with POST when the job succeeds, fails or is cancelled (JSON body, retried with "
        "back-off, signed in X-GID-Signature-256 when the server has GID_WEBHOOK_SECRET; see service.webhooks)",
    )
    # Write-only: excluded from every dump, so never stored in the job's config nor returned.
    webhook_secret: SecretStr | None = Field(
        None, min_length=16, max_length=256, exclude=True,
        description="this job's HMAC-SHA256 key for the webhook's X-GID-Signature-256, instead of the server's "
        "GID_WEBHOOK_SECRET; write-only (never returned)",
    )

    @field_validator("webhook_secret")
    @classmethod
    def _secret_needs_url(cls, secret: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        # (an invalid webhook_url is missing from info.data: reported once, as itself)
        if secret is not None and "webhook_url" in info.data and info.data["webhook_url"] is None:
            raise ValueError("a webhook_secret needs a webhook_url")
        return secret


class DatasetPathCreate(StrictModel):
    """Register a dataset already on the server, inside one of ``settings.data_roots``."""

    name: str = Name
    annotations: str | None = Field(
        None, description="absolute path of the COCO annotation JSON; with unlabeled, optional (a COCO file "
        "that lists the images; none: every image file in the folder)",
    )
    images: str = Field(description="absolute path of the folder the file_names are relative to")
    unlabeled: bool = Field(
        False, description="images without labels, for a distillation job's unlabeled_dataset only",
    )


# --------------------------------------------------------------------------------------------
# Responses


class DatasetOut(_Out):
    id: str
    name: str
    source: str
    num_images: int
    num_annotations: int
    num_categories: int
    categories: list[str]
    labeled: bool = Field(True, description="false: images only, usable as a job's unlabeled_dataset")
    created_at: datetime


class ModelOut(_Out):
    id: str
    name: str
    arch: str
    config: dict[str, Any]
    categories: list[str] | None
    sha256: str
    size: int
    source_job_id: str | None
    created_at: datetime


class WeightsOut(BaseModel):
    """torchvision's published weights by name, and whether the server's cache holds the file."""

    name: str = Field(description="'torchvision:<WeightsEnum>.<member>': a job's teacher.weights or backbone_weights")
    kind: Literal["detector", "backbone"]
    arch: str | None = Field(description="the detector's arch (detectors)")
    backbone: str
    categories: list[str] | None = Field(description="label order, COCO's unused ids as 'N/A' (detectors)")
    file_name: str = Field(description="torchvision's file name: what `gid weights import` uploads")
    hash_prefix: str = Field(description="the file's sha256 starts with this (the part of its name after '-')")
    url: str = Field(description="where torchvision publishes the file")
    present: bool = Field(description="the file is in the server's cache: jobs may use the name")


class WeightsStored(WeightsOut):
    sha256: str
    size: int


class Progress(BaseModel):
    model_config = ConfigDict(extra="allow")

    iteration: int = 0
    max_iters: int | None = None
    epoch: float | None = None
    eta_seconds: float | None = None


class AttemptOut(_Out):
    """One run of the job: ``cause`` is None while it runs, then why it ended."""

    number: int
    cause: str | None
    started_at: datetime
    ended_at: datetime | None


class JobOut(_Out):
    id: str
    name: str | None
    tags: list[str] = Field(default_factory=list)
    kind: str
    status: str
    progress: Progress
    latest_metrics: dict[str, Any] | None
    final_metrics: dict[str, Any] | None
    error: str | None
    cancel_requested: bool
    attempts: int
    attempt_history: list[AttemptOut] = Field(
        default_factory=list, description="each run of the job, oldest first, with why it ended"
    )
    output_model_id: str | None
    train_dataset_id: str
    val_dataset_id: str | None
    unlabeled_dataset_id: str | None = None
    teacher_model_id: str | None
    init_model_id: str | None
    config: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class MetricSeries(BaseModel):
    steps: list[int]
    values: list[float]
    count: int = Field(description="points stored for this series in the requested step range")
    downsampled: bool


class MetricsOut(BaseModel):
    job_id: str
    series: dict[str, MetricSeries]
    last_step: int | None = Field(description="pass as since_step to fetch only newer points")


class ArtifactOut(_Out):
    name: str
    size: int
    sha256: str
    created_at: datetime


class KindUsage(BaseModel):
    count: int
    bytes: int


class UsageOut(BaseModel):
    datasets: KindUsage = Field(description="bytes: uploaded datasets (one registered by path is not stored here)")
    models: KindUsage = Field(description="bytes: model files under models/ (a job's output counts with its job)")
    jobs: KindUsage = Field(description="bytes: the jobs' folders (checkpoints, export, logs)")
    total_bytes: int
    exact: bool = Field(description="False when the bounded folder walk stopped early (bytes are lower bounds)")


class HealthOut(BaseModel):
    status: Literal["ok"]


class CheckOut(BaseModel):
    ok: bool
    error: str | None = Field(description="the kind of failure (e.g. timeout, ConnectionError); None when ok")
    latency_ms: float


class ReadinessOut(BaseModel):
    status: Literal["ok", "unavailable"]
    database: CheckOut
    broker: CheckOut


# --------------------------------------------------------------------------------------------
# Specs (``GET /v1/specs/{kind}``, ``service.specs``)


class EvaluateCreate(StrictModel):
    """An evaluation job: COCO AP of a model (uploaded, trained, or torchvision's published COCO
    detector by weights name: exactly one) on a labelled dataset. Its final metrics are ``AP``,
    ``AP50``, ``AP75``, ``APs``, ``APm``, ``APl`` (percent)."""

    kind: Literal["evaluate"]
    name: str | None = Field(None, min_length=1, max_length=200, description="a name to find the job by")
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS, description="labels to filter jobs by")
    model_id: str | None = Field(None, description="the model to evaluate: id, unique name or unique id prefix")
    weights: str | None = Field(
        None, description="instead of model_id: torchvision's COCO detector by weights name (GET /v1/weights); "
        "its categories meet the dataset's by name",
    )
    class_map: dict[str, str] | None = Field(
        None, max_length=10_000,
        description="dataset class name -> the model's class name, where the names differ (a model of other classes)",
    )
    dataset: str = Field(description="the COCO dataset to evaluate on: id, unique name or unique id prefix")
    min_size: int | None = Field(None, ge=32, le=4096, description="input size (shorter side); default: the model's")
    max_size: int | None = Field(None, ge=32, le=8192, description="input size (longer side); default: the model's")
    batch_size: int = Field(8, ge=1, le=4096, description="images per evaluation step, split across devices")
    resources: Resources = Field(default_factory=Resources)
    webhook_url: WebhookUrl | None = Field(None, description="as in a training job")

    @field_validator("tags")
    @classmethod
    def _distinct_tags(cls, tags: list[str]) -> list[str]:
        return JobCreate._distinct_tags(tags)

    @model_validator(mode="after")
    def _one_model(self) -> "EvaluateCreate":
        if (self.model_id is None) == (self.weights is None):
            raise ValueError("give exactly one of model_id and weights")
        return self


# What POST /v1/jobs takes: a training job or an evaluation, told apart by ``kind``.
JobRequest = Annotated[JobCreate | EvaluateCreate, Field(discriminator="kind")]


class FieldDoc(BaseModel):
    description: str
    required: bool = Field(description="the body is refused without it (a placeholder stands in)")


class SpecOut(BaseModel):
    kind: Literal["train", "distill", "evaluate"]
    body: dict[str, Any] = Field(description="a complete request body: defaults, and placeholders to fill in")
    placeholders: list[str] = Field(description="dotted fields of body that hold a placeholder to replace")
    fields: dict[str, FieldDoc] = Field(description="every field of body (dotted path): what it means")
    json_schema: dict[str, Any] = Field(alias="schema", description="JSON Schema of the request body")
    accepted: bool = Field(description="whether POST /v1/jobs accepts this kind on this server")
    notes: list[str] = Field(default_factory=list, description="how the defaults were chosen")

    model_config = ConfigDict(populate_by_name=True)


# --------------------------------------------------------------------------------------------
# Experiments (``POST /v1/experiments``, ``service.experiments``)


class TeacherTrainSpec(StrictModel):
    """Train the teacher first, on the experiment's datasets; the distillation waits for it."""

    model: ModelSpec = Field(description="the teacher's architecture (a larger model than the student)")
    hyperparameters: Hyperparameters | None = Field(
        None, description="the teacher's schedule; default: the experiment's hyperparameters"
    )


class ExperimentTeacher(StrictModel):
    """Exactly one of ``model_id``, ``weights`` and ``train``."""

    model_id: str | None = Field(None, description="a trained model: id, unique name or unique id prefix")
    weights: str | None = Field(None, description="torchvision's COCO detector by weights name (GET /v1/weights)")
    train: TeacherTrainSpec | None = Field(None, description="train the teacher in the experiment")
    class_map: dict[str, str] | None = Field(None, max_length=10_000, description="as in a distill job's teacher")
    allow_missing_classes: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> "ExperimentTeacher":
        if sum(x is not None for x in (self.model_id, self.weights, self.train)) != 1:
            raise ValueError("give exactly one of model_id, weights and train")
        return self


class ExperimentCreate(StrictModel):
    """A baseline (the student trained alone) and GID (the student distilled from the teacher) on
    the same data with the same budget, evaluated on ``val_dataset``."""

    name: str | None = Field(None, min_length=1, max_length=200)
    tags: list[Tag] = Field(
        default_factory=list, max_length=MAX_TAGS - 1,
        description="added to every job it creates, beside its own experiment:<id prefix> tag",
    )
    teacher: ExperimentTeacher
    student: StudentSpec
    train_dataset: str = Field(description="dataset id, unique name or unique id prefix")
    val_dataset: str = Field(description="the dataset every model is evaluated on")
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="the budget: baseline and GID both run exactly this"
    )
    resources: Resources = Field(default_factory=Resources)

    @field_validator("tags")
    @classmethod
    def _distinct_tags(cls, tags: list[str]) -> list[str]:
        if any(tag.startswith(EXPERIMENT_TAG_PREFIX) for tag in tags):
            raise ValueError(f"tags starting with {EXPERIMENT_TAG_PREFIX!r} are the experiment's own")
        return JobCreate._distinct_tags(tags)


class ComparisonRow(BaseModel):
    """One model of the comparison; metrics are None until its job has evaluated it."""

    role: Literal["teacher", "baseline", "gid"]
    job_id: str | None
    model_id: str | None
    status: str | None = Field(description="its job's status; None for a teacher given as a model or weights")
    AP: float | None = None
    AP50: float | None = None
    AP75: float | None = None
    APs: float | None = None
    APm: float | None = None
    APl: float | None = None
    params: int | None = Field(None, description="parameters of the model")
    seconds: float | None = Field(None, description="its job's run time, first start to end")


class ExperimentOut(BaseModel):
    id: str
    name: str | None
    status: Literal["waiting_teacher", "running", "succeeded", "failed"]
    error: str | None
    jobs: dict[str, str | None] = Field(description="role -> job id (teacher, baseline, gid)")
    links: dict[str, str] = Field(description="role -> API path of its job")
    table: list[ComparisonRow]
    config: dict[str, Any]
    created_at: datetime
