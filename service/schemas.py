"""Request and response bodies of the REST API (pydantic).

Job requests reuse the engine's own ``ModelConfig`` and ``Hyperparameters`` from
``gid_core.config``, so an unknown arch, backbone or hyperparameter is refused by the same models the
engine runs with. Weights are never given as paths over the API: models are referenced by id.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator
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
    model_id: str = Field(description="a trained model (uploaded, or the output of a train job)")


class Resources(StrictModel):
    devices: int = Field(1, ge=1, le=64, description="DDP processes (GPUs on CUDA)")


class JobCreate(StrictModel):
    kind: Literal["train", "distill"]
    name: str | None = Field(None, max_length=200)
    student: StudentSpec
    teacher: TeacherSpec | None = None
    train_dataset: str = Field(description="dataset id")
    val_dataset: str | None = Field(None, description="dataset id; evaluated during and after training")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    resources: Resources = Field(default_factory=Resources)


class DatasetPathCreate(StrictModel):
    """Register a dataset already on the server, inside one of ``settings.data_roots``."""

    name: str = Name
    annotations: str = Field(description="absolute path of the COCO annotation JSON")
    images: str = Field(description="absolute path of the folder the file_names are relative to")


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
