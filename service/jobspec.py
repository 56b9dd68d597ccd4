"""Job submission: validate a ``POST /v1/jobs`` body completely, resolve ids to files, build the
engine's ``JobConfig``, and insert the job once (``Idempotency-Key``).

Every problem is reported at once with the request field it concerns, e.g.
``["body", "teacher", "model_id"]``: ids that do not resolve (422, not 404: the URL was fine, a
field of the body was not), an init model that does not fit the student, too many devices, and
whatever the engine's own cross-field rules (``gid_core.config``: the teacher, the class counts of
teacher, student and datasets, the batch split) find on the resolved inputs. Then the engine's
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
from service.errors import Conflict, FieldErrors, NotFound, field_error
from service.models import Dataset, Job, Model
from service.schemas import JobCreate

# Fields that shape the network: an init model must agree on all of them to load strictly.
STRUCTURAL_FIELDS = ("arch", "backbone", "num_classes", "fpn_channels", "norm")

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
    session: Session, *, owner_id: str, request: JobCreate, idempotency_key: str | None, max_devices: int
) -> tuple[Job, bool]:
    """Validate and insert; returns ``(job, created)``. A replayed key returns the first job
    (``created=False``); the same key with another body raises ``Conflict``."""
    digest = request_hash(request)
    if idempotency_key is not None:
        existing = crud.get_job_by_idempotency_key(session, owner_id=owner_id, key=idempotency_key)
        if existing is not None:
            return _replay(existing, digest), False
    resolved = resolve_job(session, owner_id=owner_id, request=request, max_devices=max_devices)
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


def resolve_job(session: Session, *, owner_id: str, request: JobCreate, max_devices: int) -> ResolvedJob:
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
    devices = request.resources.devices
    if devices > max_devices:
        errors.append(field_error(["body", "resources", "devices"], f"{devices} devices: the limit is {max_devices}"))
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
