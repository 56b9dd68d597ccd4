"""The API side of the database: owners and tokens, datasets and models, jobs as users see them.

Functions take the session first and keywords after; each is one unit of work that commits its own
transaction (or rolls back and raises). Job status changes are conditional
``UPDATE jobs SET ... WHERE id = :id AND status IN (...)`` statements (``set_job_status``), never
read-modify-write, so concurrent API processes and workers cannot both win; the allowed source
statuses come from ``service.models.TRANSITIONS``. The worker's side, the lease protocol, is
``service.leases``.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Row, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service import events, webhooks
from service.errors import Conflict, NotFound
from service.models import (
    ApiToken, Artifact, Dataset, Job, JobTag, MetricPoint, Model, Owner, allowed_sources, new_id, utcnow,
)
from service.status import TERMINAL_STATUSES, JobStatus

TOKEN_PREFIX = "gid_"

# --------------------------------------------------------------------------------------------
# Owners and tokens


def hash_token(token: str, *, secret: str) -> str:
    # Tokens are 256 random bits, so one keyed hash suffices (no slow password hash needed).
    return hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def get_or_create_owner(session: Session, *, name: str) -> Owner:
    owner = session.scalars(select(Owner).where(Owner.name == name)).first()
    if owner is not None:
        return owner
    owner = Owner(name=name)
    session.add(owner)
    try:
        session.commit()
    except IntegrityError:  # created concurrently
        session.rollback()
        owner = session.scalars(select(Owner).where(Owner.name == name)).one()
    return owner


def create_token(session: Session, *, owner_id: str, secret: str) -> str:
    """Store a new API token for ``owner_id``; returns the plaintext (shown once, stored hashed)."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiToken(owner_id=owner_id, token_hash=hash_token(token, secret=secret)))
    session.commit()
    return token


def get_owner_by_token(session: Session, *, token: str, secret: str) -> Row[tuple[str, str]] | None:
    """``(id, name)`` of the token's owner, or None if unknown or revoked.

    Every authenticated request pays this, so it is one statement: a lookup in the unique index of
    ``api_tokens.token_hash`` joined to the owner's primary key, returning plain columns (no ORM
    object to build or track)."""
    stmt = (
        select(Owner.id, Owner.name)
        .join(ApiToken, ApiToken.owner_id == Owner.id)
        .where(ApiToken.token_hash == hash_token(token, secret=secret), ApiToken.revoked_at.is_(None))
    )
    return session.execute(stmt).first()


# --------------------------------------------------------------------------------------------
# Datasets and models


def create_dataset(
    session: Session,
    *,
    owner_id: str,
    name: str,
    source: str,
    annotations_path: str | None,
    images_path: str,
    num_images: int,
    num_annotations: int,
    categories: list[str],
    dataset_id: str | None = None,
    labeled: bool = True,
) -> Dataset:
    dataset = Dataset(
        id=dataset_id or new_id(), owner_id=owner_id, name=name, source=source,
        annotations_path=annotations_path, images_path=images_path, num_images=num_images,
        num_annotations=num_annotations, categories=list(categories), labeled=labeled,
    )
    session.add(dataset)
    session.commit()
    return dataset


def get_dataset(session: Session, *, owner_id: str, dataset_id: str) -> Dataset:
    """The owner's dataset; ``NotFound`` if it does not exist or belongs to someone else."""
    dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.owner_id != owner_id or dataset.deleted_at is not None:
        raise NotFound("dataset", dataset_id)
    return dataset


def list_datasets(session: Session, *, owner_id: str, limit: int, offset: int) -> tuple[list[Dataset], int]:
    where = (Dataset.owner_id == owner_id, Dataset.deleted_at.is_(None))
    return _page(session, Dataset, *where, limit=limit, offset=offset)


def create_model(
    session: Session,
    *,
    owner_id: str,
    name: str,
    config: dict[str, Any],
    categories: Sequence[str] | None,
    path: str,
    sha256: str,
    size: int,
    source_job_id: str | None = None,
    model_id: str | None = None,
) -> Model:
    """Register a checkpoint file; ``config`` is a gid_core ModelConfig dict (its weights are dropped)."""
    config = {k: v for k, v in config.items() if k != "weights"}
    model = Model(
        id=model_id or new_id(), owner_id=owner_id, name=name, arch=config["arch"], config=config,
        categories=list(categories) if categories is not None else None, path=str(path),
        sha256=sha256, size=size, source_job_id=source_job_id,
    )
    session.add(model)
    session.commit()
    return model


def get_model(session: Session, *, owner_id: str, model_id: str) -> Model:
    """The owner's model; ``NotFound`` if it does not exist or belongs to someone else."""
    model = session.get(Model, model_id)
    if model is None or model.owner_id != owner_id or model.deleted_at is not None:
        raise NotFound("model", model_id)
    return model


def list_models(session: Session, *, owner_id: str, limit: int, offset: int) -> tuple[list[Model], int]:
    return _page(session, Model, Model.owner_id == owner_id, Model.deleted_at.is_(None), limit=limit, offset=offset)


def _page(session: Session, entity, *where: ColumnElement[bool], limit: int, offset: int):
    total = session.scalar(select(func.count()).select_from(entity).where(*where))
    items = session.scalars(
        select(entity).where(*where).order_by(entity.created_at.desc(), entity.id.desc()).limit(limit).offset(offset)
    ).all()
    return list(items), int(total or 0)


# --------------------------------------------------------------------------------------------
# Jobs: API side


def get_job_by_idempotency_key(session: Session, *, owner_id: str, key: str) -> Job | None:
    return session.scalars(select(Job).where(Job.owner_id == owner_id, Job.idempotency_key == key)).first()


def create_job(
    session: Session,
    *,
    owner_id: str,
    kind: str,
    name: str | None,
    config: dict[str, Any],
    engine_config: dict[str, Any],
    request_hash: str,
    idempotency_key: str | None,
    train_dataset_id: str,
    val_dataset_id: str | None = None,
    unlabeled_dataset_id: str | None = None,
    teacher_model_id: str | None = None,
    init_model_id: str | None = None,
    progress: dict[str, Any] | None = None,
    nodes: int = 1,
    tags: Sequence[str] = (),
    webhook_secret: str | None = None,
) -> tuple[Job, bool]:
    """Insert a queued job; returns ``(job, created)``.

    With an idempotency key already used by this owner (a concurrent retry won the race), returns
    ``(existing_job, False)``: the caller compares ``request_hash``.
    """
    now = utcnow()
    job = Job(
        owner_id=owner_id, kind=kind, name=name, status=JobStatus.QUEUED.value, config=config,
        engine_config=engine_config, request_hash=request_hash, idempotency_key=idempotency_key,
        train_dataset_id=train_dataset_id, val_dataset_id=val_dataset_id, unlabeled_dataset_id=unlabeled_dataset_id,
        teacher_model_id=teacher_model_id, init_model_id=init_model_id,
        progress=progress or {}, nodes=nodes, created_at=now, updated_at=now, webhook_url=config.get("webhook_url"),
        webhook_secret=webhook_secret,
    )
    job.tag_rows = [JobTag(tag=tag) for tag in tags]
    session.add(job)
    try:
        session.flush()
        _refuse_deleted_inputs(session, job)
        events.record(session, job_id=job.id, kind=events.STATUS, data={"status": JobStatus.QUEUED.value})
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        existing = get_job_by_idempotency_key(session, owner_id=owner_id, key=idempotency_key)
        if existing is None:
            raise
        return existing, False
    return job, True


def _refuse_deleted_inputs(session: Session, job: Job) -> None:
    """``NotFound`` (after a rollback) if a dataset or model of ``job`` was deleted after it was
    validated. On PostgreSQL the insert's foreign-key check waits for a concurrent delete's row
    lock (``_lock_owned``), so this read sees its outcome; SQLite runs one writer at a time."""
    datasets = [i for i in (job.train_dataset_id, job.val_dataset_id, job.unlabeled_dataset_id) if i]
    models = [i for i in (job.teacher_model_id, job.init_model_id) if i]
    gone = session.execute(
        select(Dataset.id).where(Dataset.id.in_(datasets), Dataset.deleted_at.is_not(None))
    ).first()
    kind = "dataset"
    if gone is None and models:
        gone = session.execute(select(Model.id).where(Model.id.in_(models), Model.deleted_at.is_not(None))).first()
        kind = "model"
    if gone is not None:
        session.rollback()
        raise NotFound(kind, gone[0])


def get_owned_job(session: Session, *, owner_id: str, job_id: str) -> Job:
    """The owner's job; ``NotFound`` if it does not exist or belongs to someone else."""
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or job.owner_id != owner_id:
        raise NotFound("job", job_id)
    return job


def update_job(session: Session, *, owner_id: str, job_id: str, changes: dict[str, Any]) -> Job:
    """Set the job's ``name`` and/or ``tags`` (the keys present in ``changes``; None clears)."""
    job = get_owned_job(session, owner_id=owner_id, job_id=job_id)
    if "name" in changes:
        job.name = changes["name"]
    if "tags" in changes:
        kept = {row.tag: row for row in job.tag_rows}  # a kept tag keeps its row (no delete + insert of one key)
        job.tag_rows = [kept.get(tag) or JobTag(tag=tag) for tag in changes["tags"] or ()]
    job.updated_at = utcnow()
    session.commit()
    return get_owned_job(session, owner_id=owner_id, job_id=job_id)


def list_jobs(
    session: Session, *, owner_id: str, status: str | None = None, kind: str | None = None,
    name: str | None = None, tags: Sequence[str] = (), limit: int = 50, offset: int = 0,
) -> tuple[list[Job], int]:
    """The owner's jobs, newest first; each filter given must hold (every one of ``tags``)."""
    where = [Job.owner_id == owner_id]
    if status is not None:
        where.append(Job.status == status)
    if kind is not None:
        where.append(Job.kind == kind)
    if name is not None:
        where.append(Job.name == name)
    where += [Job.id.in_(select(JobTag.job_id).where(JobTag.tag == tag)) for tag in dict.fromkeys(tags)]
    return _page(session, Job, *where, limit=limit, offset=offset)


def cancel_job(session: Session, *, owner_id: str, job_id: str) -> Job:
    """Queued -> cancelled at once; running -> cancel_requested (the worker stops it); else ``Conflict``."""
    get_owned_job(session, owner_id=owner_id, job_id=job_id)
    for _ in range(3):  # the job may start between the two conditional updates: look again
        now = utcnow()
        queued = (Job.status == JobStatus.QUEUED.value,)
        if set_job_status(session, job_id=job_id, status=JobStatus.CANCELLED, where=queued, finished_at=now):
            break
        requested = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.RUNNING.value)
            .values(cancel_requested=True, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if requested.rowcount == 1:
            data = {"status": JobStatus.RUNNING.value, "cancel_requested": True}
            events.record(session, job_id=job_id, kind=events.STATUS, data=data)
            break
        current = session.scalar(select(Job.status).where(Job.id == job_id))
        if current in TERMINAL_STATUSES:
            session.rollback()
            raise Conflict(f"job '{job_id}' is already {current}")
    session.commit()
    return get_owned_job(session, owner_id=owner_id, job_id=job_id)


def set_job_status(
    session: Session,
    *,
    job_id: str,
    status: JobStatus,
    where: Iterable[ColumnElement[bool]] = (),
    **values: Any,
) -> bool:
    """Move the job to ``status`` and set ``values``, only from the statuses the state machine allows
    and only where the extra ``where`` conditions hold; True if it moved. No commit: it is one
    statement of the caller's unit of work."""
    stmt = (
        update(Job)
        .where(Job.id == job_id, Job.status.in_(allowed_sources(status)), *where)
        .values(status=status.value, updated_at=values.pop("updated_at", utcnow()), **values)
        .execution_options(synchronize_session=False)
    )
    if session.execute(stmt).rowcount != 1:
        return False
    # After the UPDATE: its row lock orders this job's event ids (service.events).
    data = {"status": status.value, **({"error": values["error"]} if values.get("error") else {})}
    events.record(session, job_id=job_id, kind=events.STATUS, data=data)
    if status in TERMINAL_STATUSES:
        webhooks.enqueue(session, job_id=job_id, status=status.value)
    return True


# --------------------------------------------------------------------------------------------
# Deleting (the files are freed by service.deletion, after the commit)

ACTIVE_STATUSES = (JobStatus.QUEUED.value, JobStatus.RUNNING.value)


def _lock_owned(session: Session, entity, row_id: str, owner_id: str):
    """The live row, locked until the commit (``FOR UPDATE``: a job insert naming it waits)."""
    row = session.scalars(select(entity).where(entity.id == row_id).with_for_update()).first()
    if row is None or row.owner_id != owner_id or row.deleted_at is not None:
        session.rollback()
        raise NotFound(entity.__tablename__.rstrip("s"), row_id)
    return row


def _refuse_if_in_use(session: Session, what: str, *uses: ColumnElement[bool]) -> None:
    active = session.scalars(
        select(Job.id).where(or_(*uses), Job.status.in_(ACTIVE_STATUSES)).order_by(Job.created_at).limit(5)
    ).all()
    if active:
        session.rollback()
        raise Conflict(f"{what} is used by queued or running job(s) {', '.join(active)}: "
                       "cancel them or wait until they finish")


def mark_dataset_deleted(session: Session, *, owner_id: str, dataset_id: str) -> Dataset:
    """Tombstone the dataset (``Conflict`` while a queued or running job uses it). Finished jobs
    keep naming it; the API answers 404 for it from now on."""
    dataset = _lock_owned(session, Dataset, dataset_id, owner_id)
    _refuse_if_in_use(session, f"dataset '{dataset_id}'",
                      Job.train_dataset_id == dataset_id, Job.val_dataset_id == dataset_id,
                      Job.unlabeled_dataset_id == dataset_id)
    dataset.deleted_at = utcnow()
    session.commit()
    return dataset


def mark_model_deleted(session: Session, *, owner_id: str, model_id: str) -> Model:
    """Tombstone the model as above; the artifact rows of its file (a job's export) go with it."""
    model = _lock_owned(session, Model, model_id, owner_id)
    _refuse_if_in_use(session, f"model '{model_id}'", Job.teacher_model_id == model_id, Job.init_model_id == model_id)
    model.deleted_at = utcnow()
    if model.source_job_id is not None:
        session.execute(delete(Artifact).where(Artifact.job_id == model.source_job_id, Artifact.path == model.path))
    session.commit()
    return model


def delete_finished_job(session: Session, *, owner_id: str, job_id: str, moved_models: dict[str, str]) -> None:
    """Delete a finished job's row (metrics, artifacts and attempts cascade; models it produced
    keep existing with ``source_job_id`` NULL), re-pointing ``moved_models`` (id -> new path)
    in the same transaction. ``Conflict`` if it is queued or running."""
    job = get_owned_job(session, owner_id=owner_id, job_id=job_id)
    if job.output_model_id is not None:  # queued jobs hold its weights' path (engine_config): keep it
        output = job.output_model_id
        _refuse_if_in_use(session, f"job '{job_id}' produced model '{output}', which",
                          Job.teacher_model_id == output, Job.init_model_id == output)
    for model_id, path in moved_models.items():
        session.execute(update(Model).where(Model.id == model_id).values(path=path))
    gone = session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(TERMINAL_STATUSES)))
    if gone.rowcount != 1:
        session.rollback()
        raise Conflict(f"job '{job_id}' is {job.status}: cancel it and wait until it finishes to delete it")
    session.commit()


def usage_counts(session: Session, *, owner_id: str) -> dict[str, Any]:
    """Live datasets, models and jobs of the owner, with the rows the byte counts need."""
    datasets = session.execute(
        select(Dataset.id, Dataset.source).where(Dataset.owner_id == owner_id, Dataset.deleted_at.is_(None))
    ).all()
    models = session.execute(
        select(Model.path, Model.size).where(Model.owner_id == owner_id, Model.deleted_at.is_(None))
    ).all()
    jobs = session.scalars(select(Job.id).where(Job.owner_id == owner_id)).all()
    session.commit()
    return {"datasets": datasets, "models": models, "jobs": list(jobs)}


# --------------------------------------------------------------------------------------------
# Metrics and artifacts (the worker records them through service.leases)


def get_metrics(
    session: Session,
    *,
    job_id: str,
    names: Sequence[str] | None = None,
    since_step: int | None = None,
    max_points: int = 1000,
) -> dict[str, dict[str, Any]]:
    """Series by name: ``{name: {"steps", "values", "count", "downsampled"}}``, steps ascending.

    Only points with ``step > since_step``. A series with more than ``max_points`` points is cut
    into at most ``max_points`` equal step buckets, each reported as (last step, mean value), so a
    long run stays cheap to poll. A step logged twice (a resumed attempt) keeps its newest value.
    """
    where = [MetricPoint.job_id == job_id]
    if since_step is not None:
        where.append(MetricPoint.step > since_step)
    if names:
        where.append(MetricPoint.name.in_(list(names)))
    stats = session.execute(
        select(MetricPoint.name, func.count(), func.min(MetricPoint.step), func.max(MetricPoint.step))
        .where(*where)
        .group_by(MetricPoint.name)
        .order_by(MetricPoint.name)
    ).all()
    series: dict[str, dict[str, Any]] = {}
    for name, count, lo, hi in stats:
        named = [*where, MetricPoint.name == name]
        if count <= max_points:
            rows = session.execute(
                select(MetricPoint.step, MetricPoint.value).where(*named).order_by(MetricPoint.step, MetricPoint.id)
            ).all()
            latest = dict((int(step), float(value)) for step, value in rows)  # later ids win
            steps, values = list(latest), list(latest.values())
        else:
            width = math.ceil((hi - lo + 1) / max_points)  # steps per bucket: (hi - lo) // width < max_points
            bucket = (MetricPoint.step - lo) // width
            rows = session.execute(
                select(func.max(MetricPoint.step), func.avg(MetricPoint.value))
                .where(*named)
                .group_by(bucket)
                .order_by(func.max(MetricPoint.step))
            ).all()
            steps, values = [int(s) for s, _ in rows], [float(v) for _, v in rows]
        series[name] = {"steps": steps, "values": values, "count": int(count), "downsampled": count > max_points}
    session.commit()  # read-only: end the transaction (SQLite holds its lock until then)
    return series


def list_artifacts(session: Session, *, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name)))


def get_artifact(session: Session, *, job_id: str, name: str) -> Artifact:
    artifact = session.scalars(select(Artifact).where(Artifact.job_id == job_id, Artifact.name == name)).first()
    if artifact is None:
        raise NotFound("artifact", name)
    return artifact
