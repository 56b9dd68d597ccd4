"""Job submission: validate a ``POST /v1/jobs`` body completely, resolve ids to files, build the
engine's ``JobConfig``, and insert the job once (``Idempotency-Key``).

Every problem is reported at once with the request field it concerns, e.g.
``["body", "teacher", "model_id"]``: ids that do not resolve (422, not 404: the URL was fine, a
field of the body was not), class counts that disagree between teacher, student and dataset, a
teacher of another arch, a batch that does not split across the devices, too many devices. Then the
engine's own ``JobConfig`` validation runs on the resolved config and its errors are mapped back to
request fields, so the engine can never reject a job the API accepted.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from gid_core.config import DataConfig, JobConfig, ModelConfig
from service import crud
from service.errors import Conflict, FieldErrors, NotFound, field_error
from service.models import Dataset, Job, Model
from service.schemas import JobCreate

# Fields that shape the network: an init model must agree on all of them to load strictly.
STRUCTURAL_FIELDS = ("arch", "backbone", "num_classes", "fpn_channels", "norm")


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

    if request.kind == "distill" and request.teacher is None:
        errors.append(field_error(["body", "teacher"], "required when kind is 'distill'", "missing"))
    if request.kind == "train" and request.teacher is not None:
        errors.append(field_error(["body", "teacher"], "only allowed when kind is 'distill'"))
    errors += _class_errors(student.num_classes, train, val, teacher)
    if teacher is not None and teacher.config["arch"] != student.arch:
        errors.append(field_error(
            ["body", "teacher", "model_id"],
            f"teacher arch '{teacher.config['arch']}' != student.arch '{student.arch}': "
            "GID matches dense predictions one to one",
        ))
    if init is not None:
        differing = [f for f in STRUCTURAL_FIELDS if init.config.get(f) != getattr(student, f)]
        if differing:
            detail = ", ".join(f"{f} {init.config.get(f)!r} vs {getattr(student, f)!r}" for f in differing)
            errors.append(field_error(["body", "student", "init_model_id"], f"model does not fit the student: {detail}"))
    devices = request.resources.devices
    if devices > max_devices:
        errors.append(field_error(["body", "resources", "devices"], f"{devices} devices: the limit is {max_devices}"))
    if request.hyperparameters.batch_size % devices:
        errors.append(field_error(
            ["body", "hyperparameters", "batch_size"],
            f"batch_size {request.hyperparameters.batch_size} is not divisible by resources.devices {devices}",
        ))
    if errors:
        raise FieldErrors(errors)
    engine = build_engine_config(request, train=train, val=val, teacher=teacher, init=init)
    return ResolvedJob(request=request, engine=engine, train=train, val=val, teacher=teacher, init=init)


def _class_errors(num_classes: int, train: Dataset | None, val: Dataset | None, teacher: Model | None) -> list[dict]:
    errors = []
    if train is not None and num_classes != train.num_categories:
        errors.append(field_error(
            ["body", "student", "num_classes"],
            f"student.num_classes {num_classes} != {train.num_categories} categories of train_dataset '{train.id}'",
            "class_mismatch",
        ))
    if train is not None and val is not None and val.categories != train.categories:
        errors.append(field_error(
            ["body", "val_dataset"],
            f"categories {val.categories} differ from train_dataset's {train.categories}",
            "class_mismatch",
        ))
    if teacher is not None:
        teacher_classes = teacher.config["num_classes"]
        if teacher_classes != num_classes:
            errors.append(field_error(
                ["body", "teacher", "model_id"],
                f"teacher has {teacher_classes} classes but student.num_classes is {num_classes}",
                "class_mismatch",
            ))
        elif train is not None and teacher.categories is not None and teacher.categories != train.categories:
            errors.append(field_error(
                ["body", "teacher", "model_id"],
                f"teacher categories {teacher.categories} differ from train_dataset's {train.categories}",
                "class_mismatch",
            ))
    return errors


def build_engine_config(
    request: JobCreate, *, train: Dataset, val: Dataset | None, teacher: Model | None, init: Model | None
) -> JobConfig:
    """The engine's ``JobConfig`` with every id replaced by the stored file it names."""
    try:
        return JobConfig(
            kind=request.kind,
            student=request.student.to_model_config(weights=init.path if init else None),
            teacher=ModelConfig(**teacher.config, weights=teacher.path) if teacher else None,
            data=DataConfig(
                train_annotations=train.annotations_path,
                train_images=train.images_path,
                val_annotations=val.annotations_path if val else None,
                val_images=val.images_path if val else None,
            ),
            hyperparameters=request.hyperparameters,
            devices=request.resources.devices,
        )
    except ValidationError as e:
        raise FieldErrors([_engine_error(err) for err in e.errors()]) from None


# Where a JobConfig field comes from in the request body.
_ENGINE_TO_REQUEST: dict[str, list[str]] = {
    "kind": ["kind"],
    "student": ["student"],
    "teacher": ["teacher", "model_id"],
    "data": ["train_dataset"],
    "hyperparameters": ["hyperparameters"],
    "devices": ["resources", "devices"],
}
_LEADING_FIELD = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*)")


def _engine_error(err: dict[str, Any]) -> dict[str, Any]:
    msg = str(err["msg"]).removeprefix("Value error, ")
    loc = [str(p) for p in err["loc"]]
    if not loc:  # a model-level validator: its message starts with the field it is about
        match = _LEADING_FIELD.match(msg)
        loc = match.group(1).split(".") if match else []
    if loc and loc[0] in _ENGINE_TO_REQUEST:
        head = _ENGINE_TO_REQUEST[loc[0]]
        rest = [] if loc[0] in ("teacher", "data", "devices") else loc[1:]
        loc = head + rest
    else:
        loc = []
    return field_error(["body", *loc], msg, "engine_config")
