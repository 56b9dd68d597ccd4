"""Evaluation jobs (``POST /v1/jobs`` with ``kind: evaluate``): COCO AP of a model on a dataset.

Validated completely at submission, like a training job (``service.jobspec``): the model (an
uploaded or trained model, or torchvision's COCO detector by weights name, whose file must be on
the server), the dataset (labelled), how the model's classes meet the dataset's (by name, as a
distillation matches a teacher: ``gid_core.classmap``; a dataset class the model lacks is a 422),
and the job limits. The job row names the dataset as its ``train_dataset_id`` (the column is
required) and ``val_dataset_id``, an uploaded model as its ``init_model_id`` (the weights it
loads), so neither can be deleted while the job is queued or running. Its ``engine_config`` is the
engine's ``EvalConfig``; the worker runs it in a child process (``worker.runner --evaluate``) and
stores the metrics as the job's final metrics, metric points at step 0 and a ``final`` event.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from gid_core.classmap import match_classes
from gid_core.config import EvalConfig, ModelConfig, TeacherClasses, batch_split_problems, dataset_class_problems
from gid_core.errors import Problem
from gid_core.weights import WeightsError, categories_for, model_config_for, weights_problems
from service import crud, jobspec, webhooks, weights_store, workers
from service import lookup as refs
from service.core.config import Settings
from service.errors import FieldErrors, NotFound, field_error
from service.models import Dataset, Job, Model
from service.schemas import EvaluateCreate

EVAL_NUM_WORKERS = 2  # data-loading processes per device (within the server's max_num_workers)


def submit_evaluation(
    session: Session, *, owner_id: str, request: EvaluateCreate, idempotency_key: str | None, digest: str,
    settings: Settings,
) -> tuple[Job, bool]:
    """Validate and insert a queued evaluation job; ``(job, created)`` as ``jobspec.submit_job``."""
    engine, dataset, model = resolve_evaluation(session, owner_id=owner_id, request=request, settings=settings)
    return crud.create_job(
        session, owner_id=owner_id, kind="evaluate", name=request.name, tags=request.tags,
        config=request.model_dump(mode="json"), engine_config=engine.model_dump(mode="json"),
        request_hash=digest, idempotency_key=idempotency_key, train_dataset_id=dataset.id,
        val_dataset_id=dataset.id, init_model_id=model.id if model else None, nodes=1,
        progress={"iteration": 0, "max_iters": None, "epoch": None, "eta_seconds": None},
    )


def resolve_evaluation(
    session: Session, *, owner_id: str, request: EvaluateCreate, settings: Settings
) -> tuple[EvalConfig, Dataset, Model | None]:
    """The engine's ``EvalConfig`` with stored paths; ``FieldErrors`` lists every problem at once."""
    errors: list[dict[str, Any]] = []
    dataset = _lookup(session, owner_id, "dataset", request.dataset, ["dataset"], errors)
    model, config, categories = None, None, None
    if request.model_id is not None:
        model = _lookup(session, owner_id, "model", request.model_id, ["model_id"], errors)
        if model is not None:
            config = ModelConfig(**{**model.config, "backbone_weights": None}, weights=model.path)
            categories = model.categories
    else:
        try:
            config, categories = model_config_for(request.weights), categories_for(request.weights)
        except WeightsError as e:
            errors += [field_error(["body", "weights"], p.message, p.code) for p in e.problems]
    if dataset is not None and not dataset.labeled:
        errors.append(field_error(["body", "dataset"], f"dataset '{dataset.name}' has no labels (images only)",
                                  "unlabeled_dataset"))
    if config is not None:
        config, size_errors = _sized(config, request)
        errors += size_errors
    if config is not None and not errors:
        errors += _model_errors(request, config, categories, dataset, settings)
    errors += _limit_errors(request, settings)
    if request.webhook_url is not None:
        refusal = webhooks.submission_refusal(str(request.webhook_url), allow_private=settings.webhook_allow_private)
        if refusal:
            errors.append(field_error(["body", "webhook_url"], refusal, "webhook_address"))
    if not errors:
        errors += workers.resource_errors(session, nodes=1, devices=request.resources.devices,
                                          stale_seconds=settings.job_lease_seconds)
    if errors:
        raise FieldErrors(errors)
    classes = TeacherClasses(categories=categories, class_map=request.class_map) if categories is not None else None
    engine = EvalConfig(
        model=config, annotations=dataset.annotations_path, images=dataset.images_path,
        batch_size=request.batch_size // request.resources.devices, devices=request.resources.devices,
        num_workers=min(EVAL_NUM_WORKERS, settings.max_num_workers), model_classes=classes,
    )
    return engine, dataset, model


def _lookup(session: Session, owner_id: str, kind: str, ref: str, loc: list[str], errors: list[dict]) -> Any:
    try:
        full_id = refs.resolve_id(session, kind, owner_id=owner_id, ref=ref)
        getter = crud.get_dataset if kind == "dataset" else crud.get_model
        return getter(session, owner_id=owner_id, **{f"{kind}_id": full_id})
    except NotFound as e:
        errors.append(field_error(["body", *loc], f"{e.kind} '{e.resource_id}' not found", "not_found"))
    except refs.Ambiguous as e:
        errors.append({**field_error(["body", *loc], str(e), "ambiguous"), "ctx": {"candidates": e.candidates}})
    return None


def _model_field(request: EvaluateCreate) -> str:
    return "model_id" if request.model_id is not None else "weights"


def _sized(config: ModelConfig, request: EvaluateCreate) -> tuple[ModelConfig | None, list[dict[str, Any]]]:
    """The model at the input size asked for (else its own)."""
    sizes = {k: getattr(request, k) for k in ("min_size", "max_size") if getattr(request, k) is not None}
    try:
        return ModelConfig(**{**config.model_dump(), **sizes}), []
    except ValidationError as e:
        loc = ["body", "max_size" if "max_size" in sizes else "min_size"]
        return None, [field_error(loc, err["msg"], err["type"]) for err in e.errors()]


def _model_errors(
    request: EvaluateCreate, config: ModelConfig, categories: list[str] | None, dataset: Dataset, settings: Settings
) -> list[dict[str, Any]]:
    """The model's weights file, its input size within the limits, and its classes against the dataset's."""
    field = _model_field(request)
    problems: list[Problem] = weights_problems(config, check_files=False) or \
        weights_store.missing_file_problems(config, settings)
    errors = [field_error(["body", field], p.message, p.code) for p in problems]
    for name in ("min_size", "max_size"):
        value = getattr(config, name)
        if value > settings.max_image_size:
            loc = name if getattr(request, name) is not None else field
            errors.append(jobspec.over_limit([loc], f"{name} {value}", settings.max_image_size, "max_image_size"))
    return errors + _class_errors(request, config, categories, dataset)


def _class_errors(
    request: EvaluateCreate, config: ModelConfig, categories: list[str] | None, dataset: Dataset
) -> list[dict[str, Any]]:
    """The model's classes meet the dataset's by name (``class_map`` where names differ); a model
    of unknown categories must have the dataset's classes, in its order."""
    field = _model_field(request)
    if categories is None:
        errors = [field_error(["body", field], p.message, p.code) for p in dataset_class_problems(
            config.num_classes, dataset.categories, loc=("num_classes",), dataset=f"dataset '{dataset.name}'")]
        if request.class_map:
            errors.append(field_error(["body", "class_map"], "the model's categories are not known, so classes "
                                      "cannot be matched by name", "unknown_class"))
        return errors
    match, problems = match_classes(dataset.categories, categories, request.class_map)
    # locs ("teacher_classes", "class_map", key) or ("teacher_classes", "categories")
    errors = [field_error(["body", *(p.loc[1:] if p.loc[1:2] == ("class_map",) else [field])],
                          p.message.replace("the teacher", "the model"), p.code) for p in problems]
    if match.missing:
        errors.append(field_error(["body", field], f"the model's classes lack the dataset's {list(match.missing)}: "
                                  "map each to a class of the model in class_map", "class_missing"))
    return errors


def _limit_errors(request: EvaluateCreate, settings: Settings) -> list[dict[str, Any]]:
    devices = request.resources.devices
    errors = []
    if request.resources.nodes != 1:
        errors.append(field_error(["body", "resources", "nodes"], "an evaluation runs on one node", "value_error"))
    if devices > settings.max_devices:
        errors.append(jobspec.over_limit(["resources", "devices"], f"devices {devices}", settings.max_devices,
                                         "max_devices"))
    errors += [field_error(["body", "batch_size"], p.message, p.code)
               for p in batch_split_problems(request.batch_size, devices)]
    per_device = settings.max_batch_per_device
    if request.batch_size > per_device * devices:
        errors.append(jobspec.over_limit(["batch_size"], f"batch_size {request.batch_size}", per_device * devices,
                                         "max_batch_per_device", f"{per_device} per device on {devices} device(s), "))
    return errors
