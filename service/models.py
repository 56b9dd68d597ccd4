"""Database tables (SQLAlchemy 2 typed ORM) and the job state machine.

Tables: ``owners``, ``api_tokens``, ``datasets``, ``models``, ``jobs``, ``job_attempts``, ``metrics``,
``artifacts``, ``job_tags``, ``job_events``, ``webhook_deliveries``, ``workers``, ``job_nodes``, ``experiments``.
Ids are UUID strings. Datetimes are timezone-aware UTC in Python; ``UTCDateTime`` stores them as
``timestamptz`` on PostgreSQL and as naive UTC text on SQLite, and hands back aware UTC either way.

Job states::

    queued ──► running ──► succeeded | failed | cancelled
      │          │
      │          └──► queued      (requeue: the worker holding the lease was lost)
      └──► cancelled              (cancelled before any worker took it)

``check_transition`` refuses anything else; the conditional UPDATEs in ``service.crud`` take their
``WHERE status IN (...)`` from ``allowed_sources`` so the database enforces the same table.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import true as sa_true
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.status import JobStatus


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend; naive datetimes are refused (they are ambiguous)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: use timezone-aware UTC datetimes")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


# 64-bit ids on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY (its rowid).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


# --------------------------------------------------------------------------------------------
# Job state machine


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED}),
    JobStatus.RUNNING: frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


class IllegalTransition(ValueError):
    """A job status change the state machine does not allow."""

    def __init__(self, current: str, target: str) -> None:
        super().__init__(f"illegal job transition {current!r} -> {target!r}")
        self.current, self.target = current, target


def check_transition(current: str, target: str) -> None:
    """Raise ``IllegalTransition`` unless ``current -> target`` is an edge of the state machine."""
    try:
        allowed = TRANSITIONS[JobStatus(current)]
        target_status = JobStatus(target)
    except ValueError:
        raise IllegalTransition(current, target) from None
    if target_status not in allowed:
        raise IllegalTransition(current, target)


def allowed_sources(target: str) -> list[str]:
    """The statuses a job may be in to move to ``target`` (for ``WHERE status IN (...)``)."""
    target_status = JobStatus(target)
    return [str(s) for s, targets in TRANSITIONS.items() if target_status in targets]


_STATUS_CHECK = "status IN ({})".format(", ".join(f"'{s}'" for s in JobStatus))

# --------------------------------------------------------------------------------------------
# Tables


class Owner(Base):
    __tablename__ = "owners"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # HMAC-SHA256 hex of the token
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (
        Index("ix_datasets_owner_created", "owner_id", "created_at"),
        CheckConstraint("source IN ('path', 'upload')", name="ck_datasets_source"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    source: Mapped[str] = mapped_column(String(16))  # "path" (registered in place) or "upload"
    annotations_path: Mapped[str | None] = mapped_column(Text)  # None: an image-only folder
    images_path: Mapped[str] = mapped_column(Text)
    num_images: Mapped[int] = mapped_column(Integer)
    num_annotations: Mapped[int] = mapped_column(Integer)
    categories: Mapped[list[Any]] = mapped_column()  # names in label order: label L is categories[L-1]
    # False: images without labels (issue 12), usable only as a distillation job's unlabeled_dataset
    labeled: Mapped[bool] = mapped_column(Boolean, default=True, server_default=sa_true())
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Set by DELETE: the files are freed, the row stays for the finished jobs that name it (404 to the API).
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)

    @property
    def num_categories(self) -> int:
        return len(self.categories)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (Index("ix_models_owner_created", "owner_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    arch: Mapped[str] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column()  # gid_core ModelConfig without weights
    categories: Mapped[list[Any] | None] = mapped_column(default=None)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    # Jobs and models reference each other; PostgreSQL adds this key after both tables exist.
    source_job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="SET NULL", use_alter=True, name="fk_models_source_job_id"),
        default=None,
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(default=None)  # as for datasets


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner_id", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_owner_created", "owner_id", "created_at"),
        Index("ix_jobs_status_updated", "status", "updated_at"),
        CheckConstraint(_STATUS_CHECK, name="ck_jobs_status"),
        CheckConstraint("kind IN ('train', 'distill', 'evaluate')", name="ck_jobs_kind"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)

    config: Mapped[dict[str, Any]] = mapped_column()  # the validated request body
    engine_config: Mapped[dict[str, Any]] = mapped_column()  # gid_core JobConfig with resolved paths
    request_hash: Mapped[str] = mapped_column(String(64))  # sha256 of the canonical request body
    idempotency_key: Mapped[str | None] = mapped_column(String(255), default=None)

    train_dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"))
    val_dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id"), default=None)
    unlabeled_dataset_id: Mapped[str | None] = mapped_column(
        ForeignKey("datasets.id", name="fk_jobs_unlabeled_dataset_id"), default=None
    )
    teacher_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), default=None)
    init_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), default=None)

    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    latest_metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    final_metrics: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)

    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    output_model_id: Mapped[str | None] = mapped_column(ForeignKey("models.id"), default=None)
    # Worker nodes the job spans (issue 11); >1 runs as a gang (service.workers, worker.node).
    nodes: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    # Called on terminal states (service.webhooks); a copy of the request's field, for SQL.
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)
    # The job's own HMAC key for its webhook's signature (write-only: never in a response or config).
    webhook_secret: Mapped[str | None] = mapped_column(Text, default=None)

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    # Loaded with the job (one extra IN query per page of jobs): every response shows them.
    attempt_history: Mapped[list["JobAttempt"]] = relationship(
        lazy="selectin", order_by="JobAttempt.number", cascade="all, delete-orphan", passive_deletes=True
    )
    tag_rows: Mapped[list["JobTag"]] = relationship(
        lazy="selectin", order_by="JobTag.tag", cascade="all, delete-orphan", passive_deletes=True
    )

    @property
    def tags(self) -> list[str]:
        return [row.tag for row in self.tag_rows]


class JobTag(Base):
    """A label on a job (``GET /v1/jobs?tag=``): a row per tag, so filtering is an indexed join on
    every backend instead of a JSON containment test."""

    __tablename__ = "job_tags"
    __table_args__ = (Index("ix_job_tags_tag", "tag"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    tag: Mapped[str] = mapped_column(String(64), primary_key=True)


class JobAttempt(Base):
    """One run of a job by a worker (``number`` = the job's ``attempts`` when it was claimed or
    restarted) and why it ended: ``cause`` is None while it runs, then the outcome (``succeeded``,
    ``cancelled``) or what went wrong (``training process killed by signal SIGKILL``, ``worker
    lost``, ``FloatingPointError: ...``)."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("job_id", "number", name="uq_job_attempts_job_number"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str | None] = mapped_column(String(255), default=None)
    cause: Mapped[str | None] = mapped_column(Text, default=None)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(default=None)


class MetricPoint(Base):
    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_job_name_step", "job_id", "name", "step"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(128))
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Double)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name", name="uq_artifacts_job_name"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(512))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvent(Base):
    """What happened to a job, in order (``service.events``): ``id`` is the SSE event id, so it
    only grows; each row is written in the transaction of the change it reports."""

    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # status | progress | metric | final
    data: Mapped[dict[str, Any]] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One call of a job's webhook (its outbox row, ``service.webhooks``): inserted with the
    job's terminal status, then sent and retried by the worker's sweeper until ``delivered_at``
    or ``failed_at``."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "delivered_at", "failed_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))  # the job's terminal status
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)
    failed_at: Mapped[datetime | None] = mapped_column(default=None)


class Worker(Base):
    """A live worker node and its capacity (``service.workers``): ``devices`` are the GPU ids it
    owns (``kind`` "cuda") or CPU device slots ("cpu"); ``slots`` how many jobs it runs at once. Rows whose ``heartbeat_at`` is old are dead nodes."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # the Celery node name
    address: Mapped[str] = mapped_column(String(255))  # where its peers reach it (rendezvous)
    kind: Mapped[str] = mapped_column(String(8))
    devices: Mapped[list[Any]] = mapped_column()
    slots: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobNode(Base):
    """One node slot of a multi-node job's attempt, leased by one worker node; node 0 (the worker
    holding the job's lease) publishes the rendezvous ``endpoint`` (host:port)."""

    __tablename__ = "job_nodes"
    __table_args__ = (UniqueConstraint("job_id", "attempt", "worker_node", name="uq_job_nodes_worker"),)

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_node: Mapped[str] = mapped_column(String(255))
    worker_id: Mapped[str] = mapped_column(String(255))
    endpoint: Mapped[str | None] = mapped_column(String(255), default=None)
    lease_expires_at: Mapped[datetime] = mapped_column()
    joined_at: Mapped[datetime] = mapped_column(default=utcnow)


class Experiment(Base):
    """A teacher / baseline / GID comparison (``service.experiments``): the jobs it made and the
    request they came from. ``distill_job_id`` stays null while the teacher's own training job
    runs; the experiment is advanced (the distillation job created) once that job succeeded."""

    __tablename__ = "experiments"
    __table_args__ = (Index("ix_experiments_owner_created", "owner_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("owners.id", ondelete="CASCADE"))
    name: Mapped[str | None] = mapped_column(String(200), default=None)
    config: Mapped[dict[str, Any]] = mapped_column()  # the validated request body
    teacher_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    baseline_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    distill_job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)  # why the distillation was never created
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
