"""The worker side of jobs: the lease protocol a worker runs a job under, and the reaper's sweep.

A worker (any process with a ``worker_id`` unique to it) claims a job's lease, renews it while
training, records progress, metrics and artifacts, and finishes the job; a job whose lease expires
(its worker was lost) is taken over by another claim or requeued by the reaper.

Concurrency rule, as in ``service.crud``: every status or lease change is one conditional
``UPDATE jobs SET ... WHERE id = :id AND status ... AND lease_owner ...``, never read-modify-write,
so of two workers (or a worker and the API) at most one wins. Each function commits its own
transaction.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from gid_core.fileio import finite_only
from service.crud import set_job_status
from service.models import Artifact, Job, MetricPoint, check_transition, utcnow
from service.status import TERMINAL_STATUSES, JobStatus


@dataclass(frozen=True)
class LeaseState:
    """What a heartbeat learns: ``alive`` False means the lease was lost (requeued or finished
    elsewhere: stop without finishing the job); ``cancel_requested`` means the user asked to cancel
    (stop and finish the job as cancelled)."""

    alive: bool
    cancel_requested: bool


def get_job(session: Session, *, job_id: str) -> Job | None:
    job = session.get(Job, job_id, populate_existing=True)
    session.commit()  # end the read transaction; the row stays loaded (expire_on_commit=False)
    return job


def claim_job(
    session: Session, *, job_id: str, worker_id: str, lease_seconds: float, max_attempts: int | None = None
) -> Job | None:
    """Take the lease of a queued job, or of a running job whose lease expired (its worker was lost).

    Counts the attempt and sets ``started_at`` the first time. None when the job is not claimable:
    terminal, cancel requested, out of attempts, or running under a live lease (a redelivered
    message: drop it).
    """
    now = utcnow()
    takeover = and_(Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now)
    where = [Job.id == job_id, or_(Job.status == JobStatus.QUEUED.value, takeover), Job.cancel_requested.is_(False)]
    if max_attempts is not None:
        where.append(Job.attempts < max_attempts)
    claimed = session.execute(
        update(Job)
        .where(*where)
        .values(
            status=JobStatus.RUNNING.value,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, now),
            attempts=Job.attempts + 1,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if claimed.rowcount != 1:
        session.rollback()
        return None
    job = session.get(Job, job_id, populate_existing=True)
    session.commit()
    return job


def renew_lease(session: Session, *, job_id: str, worker_id: str, lease_seconds: float) -> LeaseState:
    """The heartbeat: extend the lease while ``worker_id`` holds it, and read the cancel flag."""
    now = utcnow()
    renewed = session.execute(
        update(Job)
        .where(*_held_by(job_id, worker_id))
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
        .execution_options(synchronize_session=False)
    )
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.commit()
    return LeaseState(alive=renewed.rowcount == 1, cancel_requested=bool(cancel))


def update_progress(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    progress: dict[str, Any],
    latest_metrics: dict[str, Any] | None = None,
) -> bool:
    """Record progress (and the newest metric values) while ``worker_id`` holds the lease."""
    values: dict[str, Any] = {"progress": finite_only(progress), "updated_at": utcnow()}
    if latest_metrics is not None:
        values["latest_metrics"] = finite_only(latest_metrics)
    result = session.execute(
        update(Job).where(*_held_by(job_id, worker_id)).values(**values).execution_options(synchronize_session=False)
    )
    session.commit()
    return result.rowcount == 1


def add_metric_points(session: Session, *, job_id: str, points: Iterable[tuple[str, int, float]]) -> int:
    """Store ``(name, step, value)`` points in one executemany INSERT (call it once per log period).

    Non-finite values are skipped (JSON and SQLite cannot carry NaN); returns the number stored.
    """
    rows = [
        {"job_id": job_id, "name": str(name), "step": int(step), "value": float(value)}
        for name, step, value in points
        if math.isfinite(float(value))
    ]
    if rows:
        session.execute(insert(MetricPoint), rows)  # a list of parameter sets: one executemany
        session.commit()
    return len(rows)


def add_artifact(session: Session, *, job_id: str, name: str, path: str, size: int, sha256: str) -> Artifact:
    """Record an output file of the job (a retried attempt replaces its earlier record)."""
    session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.name == name))
    artifact = Artifact(job_id=job_id, name=name, path=str(path), size=int(size), sha256=sha256)
    session.add(artifact)
    session.commit()
    return artifact


def finish_job(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    status: str,
    error: str | None = None,
    final_metrics: dict[str, Any] | None = None,
    output_model_id: str | None = None,
) -> bool:
    """End the job as succeeded, failed or cancelled and release the lease; only while
    ``worker_id`` holds it (False otherwise: the job was taken over or already finished)."""
    target = JobStatus(status)
    if target not in TERMINAL_STATUSES:
        raise ValueError(f"finish_job: status must be one of {sorted(TERMINAL_STATUSES)}, got {status!r}")
    check_transition(JobStatus.RUNNING, target)
    now = utcnow()
    done = set_job_status(
        session, job_id=job_id, status=target, where=_held_by(job_id, worker_id),
        error=error, final_metrics=finite_only(final_metrics), output_model_id=output_model_id,
        finished_at=now, lease_owner=None, lease_expires_at=None, updated_at=now,
    )
    session.commit()
    return done


def requeue_or_fail_stale_jobs(
    session: Session, *, now: datetime | None = None, max_attempts: int
) -> tuple[list[str], list[str]]:
    """Running jobs whose lease expired: ``(requeued_ids, failed_ids)``.

    Back to queued while ``attempts < max_attempts``, otherwise failed with "worker lost N times".
    A job whose cancel was requested is cancelled instead (in neither list).
    """
    now = now or utcnow()
    stale = session.execute(
        select(Job.id, Job.attempts, Job.lease_owner, Job.cancel_requested).where(
            Job.status == JobStatus.RUNNING.value, Job.lease_expires_at < now
        )
    ).all()
    requeued: list[str] = []
    failed: list[str] = []
    for job_id, attempts, lease_owner, cancel_requested in stale:
        # Guard on what was read: a worker renewing or re-claiming meanwhile makes this a no-op.
        unchanged = (Job.lease_owner == lease_owner, Job.attempts == attempts, Job.lease_expires_at < now)
        release = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
        if cancel_requested:
            set_job_status(
                session, job_id=job_id, status=JobStatus.CANCELLED, where=unchanged, finished_at=now, **release
            )
        elif attempts < max_attempts:
            if set_job_status(session, job_id=job_id, status=JobStatus.QUEUED, where=unchanged, **release):
                requeued.append(job_id)
        elif set_job_status(
            session, job_id=job_id, status=JobStatus.FAILED, where=unchanged, finished_at=now,
            error=f"worker lost {attempts} times", **release,
        ):
            failed.append(job_id)
        session.commit()
    session.commit()  # ends the read transaction when nothing was stale
    return requeued, failed


def list_queued_job_ids(session: Session, *, older_than_seconds: float) -> list[str]:
    """Jobs queued (or requeued) at least that long ago, oldest first: their message may be lost."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    ids = session.scalars(
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED.value, Job.updated_at <= cutoff)
        .order_by(Job.created_at)
    ).all()
    session.commit()
    return list(ids)


def _held_by(job_id: str, worker_id: str) -> tuple[ColumnElement[bool], ...]:
    return (Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.lease_owner == worker_id)

