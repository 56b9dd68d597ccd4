"""Job submission: validate a ``POST /v1/jobs`` body completely, resolve ids to files, build the
engine's ``JobConfig``, and insert the job once (``Idempotency-Key``).

Every problem is reported at once with the request field it concerns, e.g.
``["body", "teacher", "model_id"]``: ids that do not resolve (422, not 404: the URL was fine, a
field of the body was not), an init model that does not fit the student, too many devices, and
whatever the engine's own cross-field rules (``gid_core.config``: the teacher, the class counts of
teacher, student and datasets, the batch split) find on the resolved inputs, and what exceeds this
deployment's job limits (``Settings``: ``max_iters``, ``max_batch_per_device``, ``max_image_size``,
``max_num_workers``, ``max_devices``). Then the engine's
``JobConfig`` validation runs on the resolved config, so the engine can never reject a job the API
accepted. Engine problems are located in ``JobConfig``; ``REQUEST_FIELDS`` maps those locations to
request fields.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from types import EllipsisType
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from gid_core.config import (
    DataConfig,
    JobConfig,
    ModelConfig,
    batch_split_problems,
    class_problems,
    teacher_problems,
)
from gid_core.errors import Loc
from service import crud
from service.core.config import Settings
from service.errors import Conflict, FieldErrors, NotFound, field_error
from service.models import Dataset, Job, Model
from service.schemas import JobCreate

# Fields that shape the network: an init model must agree on all of them to load strictly.
STRUCTURAL_FIELDS = ("arch", "backbone", "num_classes", "fpn_channels", "norm")

# Request fields bounded by a job-limit setting (the iteration counts all by max_iters).
ITERATION_FIELDS = ("max_iters", "warmup_iters", "log_period", "checkpoint_period", "eval_period")
IMAGE_SIZE_FIELDS = ("min_size", "max_size")

# Where a JobConfig location comes from in the request body; the longest matching prefix wins.
# A trailing ``...`` carries the rest of the location over: the request embeds the engine's own
# ModelConfig (student) and Hyperparameters. Every teacher field comes from the model it names.
REQUEST_FIELDS: dict[Loc, tuple[str | EllipsisType, ...]] = {
    ("kind",): ("kind",),
    ("student",): ("student", ...),
    ("student", "weights"): ("student", "init_model_id"),
    ("teacher",): ("teacher",),
    **{("teacher", name): ("teacher", "model_id") for name in ModelConfig.model_fields},
    ("data",): ("val_dataset",),  # DataConfig's own rule: val annotations and images come as a pair
    ("data", "train_annotations"): ("train_dataset",),
    ("data", "train_images"): ("train_dataset",),
    ("data", "val_annotations"): ("val_dataset",),
    ("data", "val_images"): ("val_dataset",),
    ("hyperparameters",): ("hyperparameters", ...),
    ("devices",): ("resources", "devices"),
}


def request_loc(engine_loc: Loc) -> list[str | int]:
    """The request field (``["body", ...]``) that a ``JobConfig`` location comes from; the body as
    a whole for JobConfig itself."""
    for end in range(len(engine_loc), 0, -1):
        target = REQUEST_FIELDS.get(engine_loc[:end])
        if target is not None:
            if target[-1] is ...:
                return ["body", *target[:-1], *engine_loc[end:]]
            return ["body", *target]
    return ["body"]


@dataclass
class ResolvedJob:
    request: JobCreate
    engine: JobConfig
    train: Dataset
    val: Dataset | None
    teacher: Model | None
    init: Model | None


def request_hash(request: JobCreate) -> str:
    """sha256 of the canonical body (defaults filled in): equal requests hash equal."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_job(
    session: Session, *, owner_id: str, request: JobCreate, idempotency_key: str | None, settings: Settings
) -> tuple[Job, bool]:
    """Validate and insert; returns ``(job, created)``. A replayed key returns the first job
    (``created=False``); the same key with another body raises ``Conflict``."""
    digest = request_hash(request)
    if idempotency_key is not None:
        existing = crud.get_job_by_idempotency_key(session, owner_id=owner_id, key=idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    resolved = resolve_job(session, owner_id=owner_id, request=request, settings=settings)
    hp = request.hyperparameters
    job, created = crud.create_job(
        session,
        owner_id=owner_id,
        kind=request.kind,
        name=request.name,
        config=request.model_dump(mode="json"),
        engine_config=resolved.engine.model_dump(mode="json"),
        request_hash=digest,
        idempotency_key=idempotency_key,
        train_dataset_id=resolved.train.id,
        val_dataset_id=resolved.val.id if resolved.val else None,
        teacher_model_id=resolved.teacher.id if resolved.teacher else None,
        init_model_id=resolved.init.id if resolved.init else None,
        progress={"iteration": 0, "max_iters": hp.max_iters, "epoch": None, "eta_seconds": None},
    )
    return (job, True) if created else (_replay(job, digest), False)


def _replay(job: Job, digest: str) -> Job:
    if job.request_hash != digest:
        raise Conflict("Idempotency-Key was already used for a different request body")
    return job


def resolve_job(session: Session, *, owner_id: str, request: JobCreate, settings: Settings) -> ResolvedJob:
    errors: list[dict[str, Any]] = []

    def lookup(getter, loc: list[str], **ids):
        try:
            return getter(session, owner_id=owner_id, **ids)
        except NotFound as e:
            errors.append(field_error(["body", *loc], f"{e.kind} '{e.resource_id}' not found", "not_found"))
            return None

    student = request.student
    train = lookup(crud.get_dataset, ["train_dataset"], dataset_id=request.train_dataset)
    val = lookup(crud.get_dataset, ["val_dataset"], dataset_id=request.val_dataset) if request.val_dataset else None
    teacher = lookup(crud.get_model, ["teacher", "model_id"], model_id=request.teacher.model_id) if request.teacher else None
    init = lookup(crud.get_model, ["student", "init_model_id"], model_id=student.init_model_id) if student.init_model_id else None

    errors += _engine_rule_errors(request, train=train, val=val, teacher=teacher)
    if init is not None:
        differing = [f for f in STRUCTURAL_FIELDS if init.config.get(f) != getattr(student, f)]
        if differing:
            detail = ", ".join(f"{f} {init.config.get(f)!r} vs {getattr(student, f)!r}" for f in differing)
            errors.append(field_error(["body", "student", "init_model_id"], f"model does not fit the student: {detail}"))
    errors += limit_errors(request, _teacher_config(teacher) if teacher else None, settings)
    if errors:
        raise FieldErrors(errors)
    engine = build_engine_config(request, train=train, val=val, teacher=teacher, init=init)
    return ResolvedJob(request=request, engine=engine, train=train, val=val, teacher=teacher, init=init)


def _engine_rule_errors(
    request: JobCreate, *, train: Dataset | None, val: Dataset | None, teacher: Model | None
) -> list[dict[str, Any]]:
    """The engine's cross-field rules on what resolved (an id that did not is reported already)."""
    teacher_config = _teacher_config(teacher) if teacher else None
    problems = []
    if request.teacher is None or teacher is not None:
        problems += teacher_problems(request.kind, request.student, teacher_config)
    problems += class_problems(
        request.student.num_classes,
        teacher_classes=teacher_config.num_classes if teacher_config else None,
        teacher_categories=teacher.categories if teacher else None,
        train_categories=train.categories if train else None,
        val_categories=val.categories if val else None,
    )
    problems += batch_split_problems(request.hyperparameters.batch_size, request.resources.devices)
    return [field_error(request_loc(p.loc), p.message, p.code) for p in problems]


def limit_errors(request: JobCreate, teacher: ModelConfig | None, settings: Settings) -> list[dict[str, Any]]:
    """What exceeds this deployment's job limits, each error naming the field, the limit and the setting."""
    hp, devices = request.hyperparameters, request.resources.devices
    checks = [  # (request loc, what the message calls it, value, setting)
        *((["hyperparameters", f], f, getattr(hp, f), "max_iters") for f in ITERATION_FIELDS),
        (["hyperparameters", "num_workers"], "num_workers", hp.num_workers, "max_num_workers"),
        (["resources", "devices"], "devices", devices, "max_devices"),
        *((["student", f], f, getattr(request.student, f), "max_image_size") for f in IMAGE_SIZE_FIELDS),
        *((["teacher", "model_id"], f"the teacher's {f}", getattr(teacher, f), "max_image_size")
          for f in IMAGE_SIZE_FIELDS if teacher is not None),
    ]
    errors = [
        _over_limit(loc, f"{what} {value}", getattr(settings, setting), setting)
        for loc, what, value, setting in checks
        if value is not None and value > getattr(settings, setting)
    ]
    # The batch is global: each device holds batch_size / devices images.
    per_device = settings.max_batch_per_device
    if hp.batch_size > per_device * devices:
        errors.append(_over_limit(
            ["hyperparameters", "batch_size"], f"batch_size {hp.batch_size}", per_device * devices,
            "max_batch_per_device", f"{per_device} per device on {devices} device(s), ",
        ))
    return errors


def _over_limit(loc: list[str], what: str, limit: int, setting: str, how: str = "") -> dict[str, Any]:
    env = f"{Settings.model_config['env_prefix']}{setting.upper()}"
    error = field_error(["body", *loc], f"{what} exceeds this server's limit of {limit} ({how}{env})", "limit_exceeded")
    error["ctx"] = {"limit": limit, "setting": env}
    return error


def _teacher_config(teacher: Model) -> ModelConfig:
    return ModelConfig(**teacher.config, weights=teacher.path)


def build_engine_config(
    request: JobCreate, *, train: Dataset, val: Dataset | None, teacher: Model | None, init: Model | None
) -> JobConfig:
    """The engine's ``JobConfig`` with every id replaced by the stored file it names."""
    try:
        return JobConfig(
            kind=request.kind,
            student=request.student.to_model_config(weights=init.path if init else None),
            teacher=_teacher_config(teacher) if teacher else None,
            data=DataConfig(
                train_annotations=train.annotations_path,
                train_images=train.images_path,
                val_annotations=val.annotations_path if val else None,
                val_images=val.images_path if val else None,
            ),
            hyperparameters=request.hyperparameters,
            devices=request.resources.devices,
        )
    except ValidationError as e:  # located in JobConfig
        errors = [field_error(request_loc(err["loc"]), err["msg"], err["type"]) for err in e.errors()]
        raise FieldErrors(errors) from None
