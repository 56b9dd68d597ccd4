"""Job submission: validate a ``POST /v1/jobs`` body completely, resolve ids to files, build the
engine's ``JobConfig``, and insert the job once (``Idempotency-Key``).

Every problem is reported at once with the request field it concerns, e.g.
``["body", "teacher", "model_id"]``: ids that do not resolve (422, not 404: the URL was fine, a
field of the body was not), an init model that does not fit the student, too many devices, and
whatever the engine's own cross-field rules (``gid_core.config``: the teacher, the class counts of
teacher, student and datasets, the batch split) find on the resolved inputs, torchvision weights
names that are unknown or whose file is not on the server (``service.weights_store``: refused
here, never mid-run), and what exceeds this
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
    TeacherClasses,
    batch_split_problems,
    class_problems,
    teacher_problems,
    unlabeled_problems,
)
from gid_core.classmap import class_match_problems
from gid_core.errors import Loc, Problem
from gid_core.weights import WeightsError, categories_for, model_config_for, weights_problems
from service import crud, webhooks, weights_store, workers
from service import lookup as refs
from service.core.config import Settings
from service.errors import Conflict, FieldErrors, NotFound, field_error
from service.models import Dataset, Job, Model
from service.schemas import EvaluateCreate, JobCreate

# Fields that shape the network: an init model must agree on all of them to load strictly.
STRUCTURAL_FIELDS = ("arch", "backbone", "num_classes", "fpn_channels", "norm", "variant", "fpn_layout")

# Request fields bounded by a job-limit setting (the iteration counts all by max_iters).
ITERATION_FIELDS = ("max_iters", "warmup_iters", "log_period", "checkpoint_period", "eval_period")
IMAGE_SIZE_FIELDS = ("min_size", "max_size")

# Where a JobConfig location comes from in the request body; the longest matching prefix wins.
# A trailing ``...`` carries the rest of the location over: the request embeds the engine's own
# ModelConfig (student) and Hyperparameters. Every teacher field comes from the model it names
# (``teacher.model_id``), or from the torchvision weights it names (``teacher.weights``: see
# ``request_loc``'s ``teacher_field``).
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
    ("data", "unlabeled_images"): ("unlabeled_dataset",),
    ("data", "unlabeled_annotations"): ("unlabeled_dataset",),
    ("hyperparameters",): ("hyperparameters", ...),
    ("devices",): ("resources", "devices"),
    # a teacher of other classes: its categories come with the teacher, the matching with the request
    ("teacher_classes",): ("teacher",),
    ("teacher_classes", "categories"): ("teacher", "model_id"),
    ("teacher_classes", "class_map"): ("teacher", "class_map", ...),
    ("teacher_classes", "allow_missing_classes"): ("teacher", "allow_missing_classes"),
}


def request_loc(engine_loc: Loc, *, teacher_field: str = "model_id") -> list[str | int]:
    """The request field (``["body", ...]``) that a ``JobConfig`` location comes from; the body as
    a whole for JobConfig itself. ``teacher_field`` is the field that names the teacher."""
    for end in range(len(engine_loc), 0, -1):
        target = REQUEST_FIELDS.get(engine_loc[:end])
        if target is not None:
            if target[-1] is ...:
                return ["body", *target[:-1], *engine_loc[end:]]
            if target == ("teacher", "model_id"):
                target = ("teacher", teacher_field)
            return ["body", *target]
    return ["body"]


@dataclass
class TeacherRef:
    """The teacher a request names: an uploaded or trained model (``model``), or torchvision's
    published detector (``teacher.weights``); ``field`` is the request field that names it."""

    field: str
    config: ModelConfig
    categories: list[Any] | None
    model: Model | None = None


@dataclass
class ResolvedJob:
    request: JobCreate
    engine: JobConfig
    train: Dataset
    val: Dataset | None
    teacher: Model | None
    init: Model | None
    teacher_ref: TeacherRef | None = None
    unlabeled: Dataset | None = None


def request_hash(request: JobCreate | EvaluateCreate, *, with_defaults: bool = False) -> str:
    """sha256 of the canonical body: equal requests hash equal. Fields at their default value are
    left out, so a field added to the request schema later (with a default that keeps the old
    behaviour) does not change the hash of a replayed request. ``with_defaults``: the form hashes
    had until 2026-11-26 (defaults filled in), still accepted on a replay (``_replay``)."""
    body = request.model_dump(mode="json", exclude_defaults=not with_defaults)
    if getattr(request, "webhook_secret", None) is not None:  # write-only, so no dump has it; a replay must match it too
        body["webhook_secret"] = hashlib.sha256(request.webhook_secret.get_secret_value().encode()).hexdigest()
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def submit_job(
    session: Session, *, owner_id: str, request: JobCreate | EvaluateCreate, idempotency_key: str | None,
    settings: Settings,
) -> tuple[Job, bool]:
    """Validate and insert; returns ``(job, created)``. A replayed key returns the first job
    (``created=False``); the same key with another body raises ``Conflict``."""
    digest = request_hash(request)
    if idempotency_key is not None:
        existing = crud.get_job_by_idempotency_key(session, owner_id=owner_id, key=idempotency_key)
        if existing is not None:
            return _replay(existing, request, digest), False
    if isinstance(request, EvaluateCreate):
        from service.evaluate import submit_evaluation  # it builds on this module's helpers

        job, created = submit_evaluation(session, owner_id=owner_id, request=request,
                                         idempotency_key=idempotency_key, digest=digest, settings=settings)
        return (job, True) if created else (_replay(job, request, digest), False)
    resolved = resolve_job(session, owner_id=owner_id, request=request, settings=settings)
    hp = request.hyperparameters
    job, created = crud.create_job(
        session,
        owner_id=owner_id,
        kind=request.kind,
        name=request.name,
        tags=request.tags,
        config=request.model_dump(mode="json"),
        engine_config=resolved.engine.model_dump(mode="json"),
        request_hash=digest,
        idempotency_key=idempotency_key,
        train_dataset_id=resolved.train.id,
        val_dataset_id=resolved.val.id if resolved.val else None,
        unlabeled_dataset_id=resolved.unlabeled.id if resolved.unlabeled else None,
        teacher_model_id=resolved.teacher.id if resolved.teacher else None,
        init_model_id=resolved.init.id if resolved.init else None,
        nodes=request.resources.nodes,
        progress={"iteration": 0, "max_iters": hp.max_iters, "epoch": None, "eta_seconds": None},
        webhook_secret=request.webhook_secret.get_secret_value() if request.webhook_secret else None,
    )
    return (job, True) if created else (_replay(job, request, digest), False)


def _replay(job: Job, request: JobCreate | EvaluateCreate, digest: str) -> Job:
    if job.request_hash not in (digest, request_hash(request, with_defaults=True)):
        raise Conflict("Idempotency-Key was already used for a different request body")
    return job


def resolve_job(session: Session, *, owner_id: str, request: JobCreate, settings: Settings) -> ResolvedJob:
    errors: list[dict[str, Any]] = []

    def lookup(getter, loc: list[str], **ids):
        ((key, ref),) = ids.items()  # dataset_id or model_id: an id, a unique name or id prefix
        try:
            full_id = refs.resolve_id(session, key.removesuffix("_id"), owner_id=owner_id, ref=ref)
            return getter(session, owner_id=owner_id, **{key: full_id})
        except NotFound as e:
            errors.append(field_error(["body", *loc], f"{e.kind} '{e.resource_id}' not found", "not_found"))
        except refs.Ambiguous as e:
            error = field_error(["body", *loc], str(e), "ambiguous")
            errors.append({**error, "ctx": {"candidates": e.candidates}})
        return None

    student = request.student
    train = lookup(crud.get_dataset, ["train_dataset"], dataset_id=request.train_dataset)
    val = lookup(crud.get_dataset, ["val_dataset"], dataset_id=request.val_dataset) if request.val_dataset else None
    unlabeled = None
    if request.unlabeled_dataset:
        unlabeled = lookup(crud.get_dataset, ["unlabeled_dataset"], dataset_id=request.unlabeled_dataset)
    errors += _labels_errors(request, train=train, val=val)
    teacher = None
    if request.teacher and request.teacher.model_id is not None:
        model = lookup(crud.get_model, ["teacher", "model_id"], model_id=request.teacher.model_id)
        teacher = _model_teacher(model) if model is not None else None
    elif request.teacher:
        teacher, weights_errors = torchvision_teacher(request.teacher.weights, student)
        errors += weights_errors
    init = lookup(crud.get_model, ["student", "init_model_id"], model_id=student.init_model_id) if student.init_model_id else None

    errors += _engine_rule_errors(request, train=train, val=val, teacher=teacher)
    errors += _weights_errors(request, teacher, settings)
    if init is not None:
        differing = [f for f in STRUCTURAL_FIELDS if _init_field(init, f) != getattr(student, f)]
        if differing:
            detail = ", ".join(f"{f} {_init_field(init, f)!r} vs {getattr(student, f)!r}" for f in differing)
            errors.append(field_error(["body", "student", "init_model_id"], f"model does not fit the student: {detail}"))
    errors += limit_errors(request, teacher, settings)
    if request.webhook_url is not None:  # an IP literal the server may not call (names: at delivery)
        refusal = webhooks.submission_refusal(str(request.webhook_url), allow_private=settings.webhook_allow_private)
        if refusal:
            errors.append(field_error(["body", "webhook_url"], refusal, "webhook_address"))
    if not errors:  # what no live worker could hold (service.workers)
        errors += workers.resource_errors(session, nodes=request.resources.nodes, devices=request.resources.devices,
                                          stale_seconds=settings.job_lease_seconds)
    if errors:
        raise FieldErrors(errors)
    engine = build_engine_config(request, train=train, val=val, teacher=teacher, init=init, unlabeled=unlabeled)
    return ResolvedJob(request=request, engine=engine, train=train, val=val,
                       teacher=teacher.model if teacher else None, init=init, teacher_ref=teacher,
                       unlabeled=unlabeled)


def _labels_errors(request: JobCreate, *, train: Dataset | None, val: Dataset | None) -> list[dict[str, Any]]:
    """Train and val datasets need labels; an image-only dataset serves only as ``unlabeled_dataset``
    (whose classes, if it has any, are never read: no class rule applies to it)."""
    errors = [
        field_error(["body", field], f"dataset '{ds.name}' has no labels (images only): use it as "
                    "unlabeled_dataset of a distillation job", "unlabeled_dataset")
        for field, ds in (("train_dataset", train), ("val_dataset", val)) if ds is not None and not ds.labeled
    ]
    problems = unlabeled_problems(request.kind, request.unlabeled_dataset is not None)
    return errors + [field_error(request_loc(p.loc), p.message, p.code) for p in problems]


def _init_field(init: Model, field: str) -> Any:
    # a model stored before a field existed was built with the field's default
    return init.config.get(field, ModelConfig.model_fields[field].default)


def _model_teacher(model: Model) -> TeacherRef:
    return TeacherRef(field="model_id", config=_teacher_config(model), categories=model.categories, model=model)


def torchvision_teacher(name: str, student: ModelConfig) -> tuple[TeacherRef | None, list[dict[str, Any]]]:
    """The teacher of torchvision's weights ``name``: the detector they rebuild, at the student's
    input size (the teacher sees the student's resized images, so it has no size of its own)."""
    try:
        config = model_config_for(name)
    except WeightsError as e:
        return None, [field_error(["body", "teacher", "weights"], p.message, p.code) for p in e.problems]
    config = ModelConfig(**{**config.model_dump(), "min_size": student.min_size, "max_size": student.max_size})
    return TeacherRef(field="weights", config=config, categories=categories_for(name)), []


def _weights_errors(request: JobCreate, teacher: TeacherRef | None, settings: Settings) -> list[dict[str, Any]]:
    """torchvision weights names that are unknown, of another backbone, or whose file is not on the
    server (unless the worker may download it): refused now, never mid-run."""
    models: list[tuple[Loc, ModelConfig]] = [(("student",), request.student.to_model_config())]
    if teacher is not None and teacher.field == "weights":
        models.append((("teacher",), teacher.config))
    problems: list[Problem] = []
    for loc, cfg in models:
        found = weights_problems(cfg, loc=loc, check_files=False)
        problems += found or weights_store.missing_file_problems(cfg, settings, loc=loc)
    field = teacher.field if teacher else "model_id"
    return [field_error(request_loc(p.loc, teacher_field=field), p.message, p.code) for p in problems]


def _engine_rule_errors(
    request: JobCreate, *, train: Dataset | None, val: Dataset | None, teacher: TeacherRef | None
) -> list[dict[str, Any]]:
    """The engine's cross-field rules on what resolved (an id that did not is reported already)."""
    teacher_config = teacher.config if teacher else None
    problems = []
    if request.teacher is None or teacher is not None:
        problems += teacher_problems(request.kind, request.student, teacher_config)
    # a teacher of known categories meets the dataset's classes by name; else it must have as many
    known = teacher is not None and teacher.categories is not None
    # an image-only train or val dataset is refused by _labels_errors: its missing classes are no second error
    train = train if train is not None and train.labeled else None
    val = val if val is not None and val.labeled else None
    problems += class_problems(
        request.student.num_classes,
        teacher_classes=teacher_config.num_classes if teacher_config and not known else None,
        train_categories=train.categories if train else None,
        val_categories=val.categories if val else None,
    )
    if teacher is not None:
        problems += class_match_problems(
            train.categories if train else None, teacher.categories, _teacher_classes(request, teacher),
            teacher_num_classes=teacher_config.num_classes,
        )
    problems += batch_split_problems(request.hyperparameters.batch_size, request.resources.world_size)
    field = teacher.field if teacher else "model_id"
    return [field_error(request_loc(p.loc, teacher_field=field), p.message, p.code) for p in problems]


def limit_errors(request: JobCreate, teacher_ref: TeacherRef | None, settings: Settings) -> list[dict[str, Any]]:
    """What exceeds this deployment's job limits, each error naming the field, the limit and the setting."""
    hp, devices, world_size = request.hyperparameters, request.resources.devices, request.resources.world_size
    teacher = teacher_ref.config if teacher_ref else None
    checks = [  # (request loc, what the message calls it, value, setting)
        *((["hyperparameters", f], f, getattr(hp, f), "max_iters") for f in ITERATION_FIELDS),
        (["hyperparameters", "num_workers"], "num_workers", hp.num_workers, "max_num_workers"),
        (["resources", "devices"], "devices", devices, "max_devices"),
        (["resources", "nodes"], "nodes", request.resources.nodes, "max_nodes"),
        *((["student", f], f, getattr(request.student, f), "max_image_size") for f in IMAGE_SIZE_FIELDS),
        *((["teacher", teacher_ref.field], f"the teacher's {f}", getattr(teacher, f), "max_image_size")
          for f in IMAGE_SIZE_FIELDS if teacher_ref is not None),
    ]
    errors = [
        over_limit(loc, f"{what} {value}", getattr(settings, setting), setting)
        for loc, what, value, setting in checks
        if value is not None and value > getattr(settings, setting)
    ]
    # The batch is global: each device of each node holds batch_size / (nodes * devices) images.
    per_device = settings.max_batch_per_device
    if hp.batch_size > per_device * world_size:
        errors.append(over_limit(
            ["hyperparameters", "batch_size"], f"batch_size {hp.batch_size}", per_device * world_size,
            "max_batch_per_device", f"{per_device} per device on {world_size} device(s), ",
        ))
    return errors


def over_limit(loc: list[str], what: str, limit: int, setting: str, how: str = "") -> dict[str, Any]:
    env = f"{Settings.model_config['env_prefix']}{setting.upper()}"
    error = field_error(["body", *loc], f"{what} exceeds this server's limit of {limit} ({how}{env})", "limit_exceeded")
    error["ctx"] = {"limit": limit, "setting": env}
    return error


def _teacher_config(teacher: Model) -> ModelConfig:
    # the model's file holds every weight: an ImageNet start it was trained from is not loaded again
    return ModelConfig(**{**teacher.config, "backbone_weights": None}, weights=teacher.path)


def _teacher_classes(request: JobCreate, teacher: TeacherRef) -> TeacherClasses:
    spec = request.teacher
    return TeacherClasses(
        categories=teacher.categories, class_map=spec.class_map if spec else None,
        allow_missing_classes=spec.allow_missing_classes if spec else False,
    )


def build_engine_config(
    request: JobCreate, *, train: Dataset, val: Dataset | None, teacher: TeacherRef | Model | None,
    init: Model | None, unlabeled: Dataset | None = None,
) -> JobConfig:
    """The engine's ``JobConfig`` with every id replaced by the stored file it names (a teacher
    by torchvision weights name keeps its name: the worker's child resolves it in the cache)."""
    if isinstance(teacher, Model):
        teacher = _model_teacher(teacher)
    try:
        return JobConfig(
            kind=request.kind,
            student=request.student.to_model_config(weights=init.path if init else None),
            teacher=teacher.config if teacher else None,
            teacher_classes=_teacher_classes(request, teacher) if teacher else None,
            data=DataConfig(
                train_annotations=train.annotations_path,
                train_images=train.images_path,
                val_annotations=val.annotations_path if val else None,
                val_images=val.images_path if val else None,
                unlabeled_images=unlabeled.images_path if unlabeled else None,
                unlabeled_annotations=unlabeled.annotations_path if unlabeled else None,
            ),
            hyperparameters=request.hyperparameters,
            devices=request.resources.world_size,  # the engine's devices: the DDP world
        )
    except ValidationError as e:  # located in JobConfig
        field = teacher.field if teacher else "model_id"
        errors = [field_error(request_loc(err["loc"], teacher_field=field), err["msg"], err["type"]) for err in e.errors()]
        raise FieldErrors(errors) from None
