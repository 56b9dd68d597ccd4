"""Experiments: the paper's comparison in one call (``POST /v1/experiments``).

An experiment is a baseline job (the student trained alone) and a GID job (the student distilled
from the teacher) with the same data and budget, both evaluated on ``val_dataset`` at their end,
plus, when the request asks for it, the teacher's own training job. ``GET`` answers the
comparison table (AP, AP50, AP75, APs/m/l, parameters, run time of each model) from the jobs'
final metrics.

Jobs never wait on each other in the workers. A GID job whose teacher is still to be trained is
not created at submission: the experiment holds ``distill_job_id`` null, and ``advance`` creates
and enqueues it once the teacher's job has succeeded (or records why it never will). Two callers
advance experiments: reading one through the API (at once, for whoever watches), and the workers'
reaper sweep (``advance_waiting``, for nobody watching). Both may race; the GID job's idempotency
key ``experiment:<id>:gid`` makes one job of it, and the experiment row takes its id conditionally.

A teacher given as a model or weights name with no AP on ``val_dataset`` (a weights name, an
uploaded model, or one whose training job evaluated elsewhere) gets an evaluation job
(``kind: evaluate``, ``service.evaluate``) as the experiment's teacher job, for its row's AP.

Everything is validated before any job is created: each job's request through ``service.jobspec``
(errors located in the experiment's body), and for a teacher still to be trained the engine's
teacher/student rule on the two architectures.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gid_core.config import ModelConfig, teacher_problems
from service import crud, evaluate, jobspec
from service import lookup as refs
from service.core.config import Settings
from service.errors import FieldErrors, NotFound, field_error
from service.models import Experiment, Job, Model, new_id, utcnow
from service.schemas import (
    EXPERIMENT_TAG_PREFIX,
    ComparisonRow, EvaluateCreate, ExperimentCreate, ExperimentOut, JobCreate, StudentSpec, TeacherSpec,
)
from service.status import JobStatus

log = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
FAILED = (JobStatus.FAILED.value, JobStatus.CANCELLED.value)


# --------------------------------------------------------------------------- the jobs' requests


def _job_request(request: ExperimentCreate, experiment_id: str, role: str, **fields: Any) -> JobCreate:
    body = {
        "name": f"{request.name}-{role}" if request.name else None,
        "tags": [*request.tags, f"{EXPERIMENT_TAG_PREFIX}{experiment_id[:8]}"],
        "student": request.student, "train_dataset": request.train_dataset, "val_dataset": request.val_dataset,
        "hyperparameters": request.hyperparameters, "resources": request.resources, **fields,
    }
    return JobCreate.model_validate({k: v.model_dump() if hasattr(v, "model_dump") else v for k, v in body.items()})


def baseline_request(request: ExperimentCreate, experiment_id: str) -> JobCreate:
    return _job_request(request, experiment_id, "baseline", kind="train")


def teacher_train_request(request: ExperimentCreate, experiment_id: str) -> JobCreate:
    train = request.teacher.train
    student = StudentSpec.model_validate(train.model.model_dump(exclude={"weights"}))
    return _job_request(request, experiment_id, "teacher", kind="train", student=student,
                        hyperparameters=train.hyperparameters or request.hyperparameters)


def distill_request(request: ExperimentCreate, experiment_id: str, *, teacher_model_id: str | None = None) -> JobCreate:
    spec = request.teacher
    teacher = TeacherSpec(model_id=teacher_model_id or spec.model_id, weights=None if teacher_model_id else spec.weights,
                          class_map=spec.class_map, allow_missing_classes=spec.allow_missing_classes)
    return _job_request(request, experiment_id, "gid", kind="distill", teacher=teacher)


def teacher_eval_request(request: ExperimentCreate, experiment_id: str) -> EvaluateCreate:
    """An evaluation of a given teacher (model or weights) on ``val_dataset``, for its row's AP; a
    teacher by weights name sees the student's input size, as in the GID job."""
    spec, devices = request.teacher, request.resources.devices
    sizes = {k: getattr(request.student, k) for k in ("min_size", "max_size")} if spec.weights else {}
    per_device = max(1, request.hyperparameters.batch_size // request.resources.world_size)
    return EvaluateCreate(
        kind="evaluate", name=f"{request.name}-teacher" if request.name else None,
        tags=[*request.tags, f"{EXPERIMENT_TAG_PREFIX}{experiment_id[:8]}"], model_id=spec.model_id, weights=spec.weights,
        class_map=spec.class_map, dataset=request.val_dataset, batch_size=per_device * devices,
        resources={"devices": devices}, **sizes,
    )


def needs_teacher_eval(session: Session, owner_id: str, request: ExperimentCreate) -> bool:
    """A given teacher without AP on ``val_dataset`` (a weights name, an uploaded model, or one whose
    training job evaluated elsewhere) gets an evaluation job; one that may lack dataset classes
    (``allow_missing_classes``) is not evaluated, as its AP would count them as missed."""
    spec = request.teacher
    if spec.train is not None or spec.allow_missing_classes:
        return False
    if spec.weights is not None:
        return True
    try:
        model = crud.get_model(session, owner_id=owner_id, model_id=refs.resolve_id(
            session, "model", owner_id=owner_id, ref=spec.model_id))
        val = refs.resolve_id(session, "dataset", owner_id=owner_id, ref=request.val_dataset)
    except (NotFound, refs.Ambiguous):
        return False  # reported by the GID job's validation
    source = session.get(Job, model.source_job_id) if model.source_job_id else None
    return source is None or source.val_dataset_id != val


def _relocated(errors: list[dict[str, Any]], moves: dict[tuple, tuple]) -> list[dict[str, Any]]:
    """A job request's errors located in the experiment's body (``moves``: old loc prefix -> new)."""
    out = []
    for error in errors:
        loc = tuple(error["loc"])
        for old, new in moves.items():
            if loc[: len(old)] == old:
                loc = new + loc[len(old):]
                break
        out.append({**error, "loc": list(loc)})
    return out


# an evaluation request's fields in the experiment's body
EVAL_MOVES = {
    ("body", "model_id"): ("body", "teacher", "model_id"), ("body", "weights"): ("body", "teacher", "weights"),
    ("body", "class_map"): ("body", "teacher", "class_map"), ("body", "dataset"): ("body", "val_dataset"),
    ("body", "batch_size"): ("body", "hyperparameters", "batch_size"),
    ("body", "min_size"): ("body", "student", "min_size"), ("body", "max_size"): ("body", "student", "max_size"),
}


def _validation_errors(session: Session, owner_id: str, request: ExperimentCreate, settings: Settings) -> list[dict]:
    def check(job: JobCreate | EvaluateCreate, moves: dict[tuple, tuple]) -> list[dict]:
        try:
            if isinstance(job, EvaluateCreate):
                evaluate.resolve_evaluation(session, owner_id=owner_id, request=job, settings=settings)
            else:
                jobspec.resolve_job(session, owner_id=owner_id, request=job, settings=settings)
        except FieldErrors as e:
            return _relocated(e.errors, moves)
        return []

    errors = check(baseline_request(request, "validate"), {})
    if request.teacher.train is None:
        errors += check(distill_request(request, "validate"), {})
    else:
        own_hp = request.teacher.train.hyperparameters is not None
        errors += check(teacher_train_request(request, "validate"), {
            ("body", "student"): ("body", "teacher", "train", "model"),
            **({("body", "hyperparameters"): ("body", "teacher", "train", "hyperparameters")} if own_hp else {}),
        })
        # the weights the teacher's job will produce (the rule checks that a teacher has some)
        teacher_cfg = request.teacher.train.model.to_model_config(weights="<trained by the experiment>")
        errors += [field_error(["body", "teacher", "train", "model"], p.message, p.code)
                   for p in teacher_problems("distill", request.student, teacher_cfg)]
    if needs_teacher_eval(session, owner_id, request):
        errors += check(teacher_eval_request(request, "validate"), EVAL_MOVES)
    unique = {json.dumps(e, sort_keys=True, default=str): e for e in errors}  # the jobs share fields
    return list(unique.values())


def _resolved_refs(session: Session, owner_id: str, request: ExperimentCreate) -> ExperimentCreate:
    """The request with full ids for the names and prefixes it used, so the experiment keeps
    meaning the same rows (a GID job created later, the teacher's metrics)."""
    update_ = {"train_dataset": refs.resolve_id(session, "dataset", owner_id=owner_id, ref=request.train_dataset),
               "val_dataset": refs.resolve_id(session, "dataset", owner_id=owner_id, ref=request.val_dataset)}
    teacher = request.teacher
    if teacher.model_id is not None:
        model_id = refs.resolve_id(session, "model", owner_id=owner_id, ref=teacher.model_id)
        update_["teacher"] = teacher.model_copy(update={"model_id": model_id})
    return request.model_copy(update=update_)


# --------------------------------------------------------------------------- create and advance


def create_experiment(
    session: Session, *, owner_id: str, request: ExperimentCreate, settings: Settings
) -> tuple[Experiment, list[str]]:
    """Validate every job, then create them and the experiment; returns it and the ids of the
    jobs to enqueue (after this commit). A job refused midway (an input deleted meanwhile)
    cancels the ones already created."""
    errors = _validation_errors(session, owner_id, request, settings)
    if errors:
        raise FieldErrors(errors)
    request = _resolved_refs(session, owner_id, request)
    experiment_id = new_id()
    planned = [("baseline", baseline_request(request, experiment_id))]
    planned.insert(0, ("teacher", teacher_train_request(request, experiment_id)) if request.teacher.train
                   else ("gid", distill_request(request, experiment_id)))
    if needs_teacher_eval(session, owner_id, request):  # the teacher's row gets its AP from this job
        planned.append(("teacher", teacher_eval_request(request, experiment_id)))
    created: dict[str, str] = {}
    try:
        for role, job_request in planned:
            job, _ = jobspec.submit_job(session, owner_id=owner_id, request=job_request,
                                        idempotency_key=f"experiment:{experiment_id}:{role}", settings=settings)
            created[role] = job.id
    except Exception:
        for job_id in created.values():
            crud.cancel_job(session, owner_id=owner_id, job_id=job_id)
        raise
    now = utcnow()
    experiment = Experiment(
        id=experiment_id, owner_id=owner_id, name=request.name, config=request.model_dump(mode="json"),
        teacher_job_id=created.get("teacher"), baseline_job_id=created["baseline"], distill_job_id=created.get("gid"),
        created_at=now, updated_at=now,
    )
    session.add(experiment)
    session.commit()
    return experiment, list(created.values())


def waiting_on_teacher(session: Session, experiment: Experiment) -> str | None:
    """The status of the teacher's finished job when ``advance`` has something to do, else None."""
    if experiment.distill_job_id is not None or experiment.error is not None or experiment.teacher_job_id is None:
        return None
    status = session.scalar(select(Job.status).where(Job.id == experiment.teacher_job_id))
    return status if status in (JobStatus.SUCCEEDED.value, *FAILED) else None


def advance(session: Session, *, experiment_id: str, settings: Settings) -> str | None:
    """Create the GID job of an experiment whose teacher job succeeded (its id, to enqueue), or
    record why it never will; None when there is nothing (more) to do."""
    experiment = session.get(Experiment, experiment_id, populate_existing=True)
    status = waiting_on_teacher(session, experiment) if experiment is not None else None
    if status is None:
        return None
    if status in FAILED:
        return _set_error(session, experiment, f"the teacher's training job {experiment.teacher_job_id} {status}")
    teacher_job = session.get(Job, experiment.teacher_job_id)
    request = distill_request(ExperimentCreate.model_validate(experiment.config), experiment.id,
                              teacher_model_id=teacher_job.output_model_id)
    try:
        job, _ = jobspec.submit_job(session, owner_id=experiment.owner_id, request=request,
                                    idempotency_key=f"experiment:{experiment.id}:gid", settings=settings)
    except (FieldErrors, NotFound) as e:  # e.g. a dataset deleted while the teacher trained
        return _set_error(session, experiment, f"the GID job was refused: {e}")
    taken = session.execute(
        update(Experiment).where(Experiment.id == experiment.id, Experiment.distill_job_id.is_(None))
        .values(distill_job_id=job.id, updated_at=utcnow()).execution_options(synchronize_session=False)
    ).rowcount
    session.commit()
    log.info("experiment %s: teacher trained, GID job %s created", experiment.id, job.id)
    return job.id if taken else None


def _set_error(session: Session, experiment: Experiment, message: str) -> None:
    session.execute(
        update(Experiment).where(Experiment.id == experiment.id, Experiment.error.is_(None),
                                 Experiment.distill_job_id.is_(None))
        .values(error=message, updated_at=utcnow()).execution_options(synchronize_session=False)
    )
    session.commit()
    return None


def advance_waiting(session: Session, *, settings: Settings, limit: int = 100) -> list[str]:
    """One sweep: advance every experiment whose teacher job has finished; the GID jobs created."""
    ids = session.scalars(
        select(Experiment.id).join(Job, Job.id == Experiment.teacher_job_id)
        .where(Experiment.distill_job_id.is_(None), Experiment.error.is_(None),
               Job.status.in_([JobStatus.SUCCEEDED.value, *FAILED]))
        .order_by(Experiment.created_at).limit(limit)
    ).all()
    session.commit()
    return [job_id for i in ids if (job_id := advance(session, experiment_id=i, settings=settings))]


# --------------------------------------------------------------------------- reading


def get_experiment(session: Session, *, owner_id: str, experiment_id: str) -> Experiment:
    experiment = session.get(Experiment, experiment_id, populate_existing=True)
    if experiment is None or experiment.owner_id != owner_id:
        raise NotFound("experiment", experiment_id)
    return experiment


def list_experiments(session: Session, *, owner_id: str, limit: int, offset: int) -> tuple[list[Experiment], int]:
    where = Experiment.owner_id == owner_id
    total = session.scalar(select(func.count()).select_from(Experiment).where(where))
    items = session.scalars(
        select(Experiment).where(where).order_by(Experiment.created_at.desc(), Experiment.id.desc())
        .limit(limit).offset(offset)
    ).all()
    return list(items), int(total or 0)


@functools.lru_cache(maxsize=256)
def _parameter_count(config_json: str) -> int:
    import torch

    from gid_core.models import build_detector

    with torch.device("meta"):  # shapes only: nothing allocated
        model = build_detector(ModelConfig.model_validate_json(config_json), load_weights=False)
    return sum(p.numel() for p in model.parameters())


def parameter_count(config: ModelConfig | dict[str, Any]) -> int | None:
    fields = config.model_dump(mode="json") if isinstance(config, ModelConfig) else dict(config)
    fields.update(weights=None, backbone_weights=None)
    try:
        return _parameter_count(json.dumps(fields, sort_keys=True))
    except Exception:  # noqa: BLE001 - a stored config of an older engine: the count is only informative
        log.warning("could not count the parameters of %s", fields.get("arch"), exc_info=True)
        return None


def _row(role: str, job: Job | None, model_config: Any, *, model_id: str | None = None,
         metrics: dict[str, Any] | None = None) -> ComparisonRow:
    metrics = metrics if metrics is not None else (job.final_metrics if job is not None else None) or {}
    seconds = None
    if job is not None and job.started_at and job.finished_at:
        seconds = (job.finished_at - job.started_at).total_seconds()
    return ComparisonRow(
        role=role, job_id=job.id if job else None, model_id=model_id or (job.output_model_id if job else None),
        status=job.status if job else None, params=parameter_count(model_config) if model_config is not None else None,
        seconds=seconds, **{k: metrics.get(k) for k in METRICS if isinstance(metrics.get(k), (int, float))},
    )


def _teacher_row(session: Session, request: ExperimentCreate, job: Job | None) -> ComparisonRow:
    spec = request.teacher
    if spec.train is not None:
        return _row("teacher", job, spec.train.model.to_model_config())
    if spec.weights is not None:
        from gid_core.weights import model_config_for

        return _row("teacher", job, model_config_for(spec.weights), metrics=None if job else {})
    if job is not None:  # its evaluation job (kind evaluate) on val_dataset
        model = session.get(Model, spec.model_id)
        return _row("teacher", job, model.config if model else None, model_id=spec.model_id)
    model = session.get(Model, spec.model_id)
    source = session.get(Job, model.source_job_id) if model is not None and model.source_job_id else None
    # its training job's final metrics compare only if they were measured on the same dataset
    same_data = source is not None and source.val_dataset_id == request.val_dataset
    row = _row("teacher", None, model.config if model else None, model_id=spec.model_id,
               metrics=(source.final_metrics or {}) if same_data else {})
    return row.model_copy(update={"job_id": source.id if same_data else None})


def experiment_out(session: Session, experiment: Experiment) -> ExperimentOut:
    request = ExperimentCreate.model_validate(experiment.config)
    ids = {"teacher": experiment.teacher_job_id, "baseline": experiment.baseline_job_id,
           "gid": experiment.distill_job_id}
    jobs = {role: session.get(Job, job_id) if job_id else None for role, job_id in ids.items()}
    student = request.student.to_model_config()
    table = [_teacher_row(session, request, jobs["teacher"]), _row("baseline", jobs["baseline"], student),
             _row("gid", jobs["gid"], student)]
    return ExperimentOut(
        id=experiment.id, name=experiment.name, status=_status(experiment, jobs), error=experiment.error, jobs=ids,
        links={role: f"/v1/jobs/{job_id}" for role, job_id in ids.items() if job_id},
        table=table, config=experiment.config, created_at=experiment.created_at,
    )


def _status(experiment: Experiment, jobs: dict[str, Job | None]) -> str:
    statuses = [job.status for job in jobs.values() if job is not None]
    if experiment.error is not None or any(s in FAILED for s in statuses):
        return "failed"
    if experiment.distill_job_id is None:
        return "waiting_teacher"
    return "succeeded" if all(s == JobStatus.SUCCEEDED.value for s in statuses) else "running"
