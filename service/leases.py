"""The worker side of jobs: the lease protocol a worker runs a job under, and the reaper's sweep.

A worker (any process with a ``worker_id`` unique to it) claims a job's lease, renews it while
training, records progress, metrics and artifacts, and finishes the job; a job whose lease expires
(its worker was lost) is taken over by another claim or requeued by the reaper.

Concurrency rule, as in ``service.crud``: every status or lease change is one conditional
``UPDATE jobs SET ... WHERE id = :id AND status ... AND lease_owner ...``, never read-modify-write,
so of two workers (or a worker and the API) at most one wins. Each function commits its own
transaction.

Every run of a job is a ``JobAttempt`` row, opened by the claim (or by ``restart_attempt`` when
the worker restarts a crashed training under the same lease) and closed with its cause by whatever
ends it: ``finish_job``, ``restart_attempt``, the reaper's requeue, ``requeue_jobs_of_worker``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from gid_core.fileio import finite_only, flatten_metrics
from service import events
from service.crud import set_job_status
from service.models import Artifact, Job, JobAttempt, MetricPoint, check_transition, utcnow
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
    number = session.scalar(select(Job.attempts).where(Job.id == job_id))
    session.add(JobAttempt(job_id=job_id, number=number, worker_id=worker_id, started_at=now))
    events.record(session, job_id=job_id, kind=events.STATUS, data={"status": JobStatus.RUNNING.value, "attempt": number})
    session.flush()
    job = session.get(Job, job_id, populate_existing=True)
    session.commit()
    return job


def claim_next_job(
    session: Session, *, job_id: str, worker_id: str, lease_seconds: float, max_attempts: int | None = None,
    lookahead: int = 8,
) -> Job | None:
    """Claim the oldest claimable queued job, else ``job_id`` (a running job whose lease expired).

    A message only wakes a worker up: which job runs is decided here, oldest submission first, so a
    job requeued after its worker died runs before jobs submitted after it, although its new
    message is behind theirs in the broker queue. (The message of the job run instead is not lost:
    it stays in the queue and, when delivered, claims the next oldest job.)
    """
    oldest = session.scalars(
        select(Job.id)
        .where(Job.status == JobStatus.QUEUED.value, Job.cancel_requested.is_(False))
        .order_by(Job.created_at, Job.id)
        .limit(lookahead)
    ).all()
    session.commit()
    for candidate in dict.fromkeys([*oldest, job_id]):
        job = claim_job(
            session, job_id=candidate, worker_id=worker_id, lease_seconds=lease_seconds, max_attempts=max_attempts
        )
        if job is not None:
            return job
    return None


def restart_attempt(
    session: Session, *, job_id: str, worker_id: str, cause: str, lease_seconds: float, max_attempts: int
) -> int | None:
    """Close the running attempt with ``cause`` and open the next one under the same lease (the
    worker restarts the training from its checkpoint); returns its number, or None when the job is
    out of attempts, has a cancel request, or is no longer held by ``worker_id``."""
    now = utcnow()
    restarted = session.execute(
        update(Job)
        .where(*_held_by(job_id, worker_id), Job.attempts < max_attempts, Job.cancel_requested.is_(False))
        .values(attempts=Job.attempts + 1, lease_expires_at=now + timedelta(seconds=lease_seconds),
                heartbeat_at=now, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    if restarted.rowcount != 1:
        session.rollback()
        return None
    _end_attempts(session, job_id, cause, now)
    number = session.scalar(select(Job.attempts).where(Job.id == job_id))
    session.add(JobAttempt(job_id=job_id, number=number, worker_id=worker_id, started_at=now))
    events.record(session, job_id=job_id, kind=events.STATUS,
                  data={"status": JobStatus.RUNNING.value, "attempt": number, "restarted_after": cause[:500]})
    session.commit()
    return number


def requeue_jobs_of_worker(session: Session, *, worker_prefix: str, cause: str = "worker died") -> list[str]:
    """Running jobs leased by a worker known to be dead (its ``lease_owner`` starts with
    ``worker_prefix``, the node name) go back to queued at once, without waiting for the lease to
    expire; returns their ids (send each a message). Cancel-requested ones are cancelled."""
    now = utcnow()
    dead = (Job.status == JobStatus.RUNNING.value, Job.lease_owner.startswith(worker_prefix, autoescape=True))
    rows = session.execute(select(Job.id, Job.lease_owner, Job.cancel_requested).where(*dead)).all()
    requeued: list[str] = []
    release = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    for job_id, lease_owner, cancel_requested in rows:
        unchanged = (Job.lease_owner == lease_owner,)
        if cancel_requested:
            moved = set_job_status(session, job_id=job_id, status=JobStatus.CANCELLED, where=unchanged,
                                   finished_at=now, **release)
        else:
            moved = set_job_status(session, job_id=job_id, status=JobStatus.QUEUED, where=unchanged, **release)
            if moved:
                requeued.append(job_id)
        if moved:
            _end_attempts(session, job_id, cause, now)
        session.commit()
    session.commit()
    return requeued


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
    if result.rowcount == 1:
        events.record(session, job_id=job_id, kind=events.PROGRESS, data=values["progress"])
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
        _lock_job(session, job_id)
        session.execute(insert(MetricPoint), rows)  # a list of parameter sets: one executemany
        events.record_metric_points(session, job_id=job_id, rows=rows)
        session.commit()
    return len(rows)


def _lock_job(session: Session, job_id: str) -> None:
    """Lock the job's row until the commit (orders its event ids: ``service.events``)."""
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())


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
    cause: str | None = None,
    final_step: int | None = None,
) -> bool:
    """End the job as succeeded, failed or cancelled and release the lease; only while
    ``worker_id`` holds it (False otherwise: the job was taken over or already finished). The
    running attempt ends with ``cause`` (default: ``error``, else the status).

    ``final_metrics`` with a ``final_step`` (the last iteration) also become points of the metric
    series (``eval/AP``, ... at that step, as the periodic evaluations are) and a ``final`` event,
    in the same transaction as the status change."""
    target = JobStatus(status)
    if target not in TERMINAL_STATUSES:
        raise ValueError(f"finish_job: status must be one of {sorted(TERMINAL_STATUSES)}, got {status!r}")
    check_transition(JobStatus.RUNNING, target)
    now = utcnow()
    if final_metrics and final_step is not None:
        # Before the status change, so the final event precedes the terminal status event; the
        # status change's WHERE decides whether any of it is kept (rolled back otherwise).
        _record_final(session, job_id, final_metrics, int(final_step))
    done = set_job_status(
        session, job_id=job_id, status=target, where=_held_by(job_id, worker_id),
        error=error, final_metrics=finite_only(final_metrics), output_model_id=output_model_id,
        finished_at=now, lease_owner=None, lease_expires_at=None, updated_at=now,
    )
    if not done:
        session.rollback()
        return False
    _end_attempts(session, job_id, cause or error or target.value, now)
    session.commit()
    return done


def _record_final(session: Session, job_id: str, metrics: dict[str, Any], step: int) -> None:
    """The final evaluation as ``eval/*`` points at ``step`` and a ``final`` event (no commit)."""
    _lock_job(session, job_id)
    points = flatten_metrics(finite_only(metrics) or {}, "eval")
    rows = [{"job_id": job_id, "name": name, "step": step, "value": value} for name, value in points.items()]
    if rows:
        session.execute(insert(MetricPoint), rows)
    events.record(session, job_id=job_id, kind=events.FINAL, data={"step": step, "metrics": metrics})


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
            moved = set_job_status(
                session, job_id=job_id, status=JobStatus.CANCELLED, where=unchanged, finished_at=now, **release
            )
        elif attempts < max_attempts:
            moved = set_job_status(session, job_id=job_id, status=JobStatus.QUEUED, where=unchanged, **release)
            if moved:
                requeued.append(job_id)
        else:
            moved = set_job_status(
                session, job_id=job_id, status=JobStatus.FAILED, where=unchanged, finished_at=now,
                error=f"worker lost {attempts} times", **release,
            )
            if moved:
                failed.append(job_id)
        if moved:
            _end_attempts(session, job_id, "worker lost (its lease expired)", now)
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


def _end_attempts(session: Session, job_id: str, cause: str, now: datetime) -> None:
    """Close the job's open attempt (no commit: part of the caller's status change)."""
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == job_id, JobAttempt.ended_at.is_(None))
        .values(cause=cause[:2000], ended_at=now)
        .execution_options(synchronize_session=False)
    )


def _held_by(job_id: str, worker_id: str) -> tuple[ColumnElement[bool], ...]:
    return (Job.id == job_id, Job.status == JobStatus.RUNNING.value, Job.lease_owner == worker_id)

