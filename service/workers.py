"""Worker capacity and gang leases: the registry of worker nodes, and how a multi-node job gathers
its nodes (issue 11; the worker side is ``worker.node``).

Registry. Every worker node (a Celery worker, named by its ``--hostname``) registers what it owns:
``kind`` "cuda" with its GPU ids, or "cpu" with ``worker_cpu_devices`` device slots; ``slots``
jobs at once. It heartbeats its row; a row older than ``job_lease_seconds`` is a dead node. The API
(``resource_errors``) refuses a job that no set of live workers could ever hold: ``nodes``
distinct workers with ``devices`` each. While no worker is registered at all, jobs are accepted and
wait queued (workers may be scaled up from zero).

Gang lease. A job with ``nodes = N > 1`` is claimed like any other job by one worker, node 0 (it
holds the job's lease: attempts, progress, finishing, as in ``service.leases``). Node 0 opens the
attempt's gang (``open_gang``: its slot and the rendezvous endpoint). Other workers, before they
claim anything, join the *oldest* gathering gang they are not in yet (``joinable_gang``,
``join_gang``): the oldest waiting gang collects slots first, and a younger gang's node 0 yields
its job back to the queue while an older gang it could join gathers (``release_gang``), so two
gangs never hold each other's workers. A gang that is not full within ``gang_timeout_seconds`` is
released: the job goes back to the queue without spending an attempt. Each node renews its own
slot (``renew_node``) and learns the gang's state: a slot whose lease expired is a lost node.

Every change is one conditional statement or an insert guarded by the primary key, as in
``service.leases``; each function commits its own transaction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.crud import set_job_status
from service.errors import field_error
from service.models import Job, JobAttempt, JobNode, Worker, utcnow
from service.status import JobStatus

# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Capacity:
    """What a worker node owns: ``kind`` "cuda" (``devices`` are GPU ids, each job's child sees its
    own subset as ``CUDA_VISIBLE_DEVICES``) or "cpu" (device slots ``cpu0..``); ``slots`` jobs at once."""

    kind: str
    devices: tuple[str, ...]
    slots: int


def detect_capacity(settings: Any) -> Capacity:
    """The GPU ids of ``worker_devices``, else ``CUDA_VISIBLE_DEVICES``, else every GPU the driver
    lists (no torch import: the Celery process stays light); none: ``worker_cpu_devices`` CPU slots.
    Slots: ``worker_slots``, else one job per GPU (a CPU worker runs one job)."""
    spec = settings.worker_devices
    if spec is None:
        spec = os.environ.get("CUDA_VISIBLE_DEVICES")
    if spec is None:
        gpus = Path("/proc/driver/nvidia/gpus")
        spec = ",".join(str(i) for i in range(len(list(gpus.iterdir())))) if gpus.is_dir() else ""
    ids = tuple(d.strip() for d in spec.split(",") if d.strip() and d.strip() != "-1")
    if ids:
        return Capacity("cuda", ids, min(settings.worker_slots or len(ids), len(ids)))
    return Capacity("cpu", tuple(f"cpu{i}" for i in range(settings.worker_cpu_devices)), settings.worker_slots or 1)



def register_worker(
    session: Session, *, worker_node: str, address: str, kind: str, devices: list[str], slots: int
) -> Worker:
    """Insert or replace the row of ``worker_node`` (a restarted node registers again)."""
    now = utcnow()
    session.execute(delete(Worker).where(Worker.id == worker_node))
    worker = Worker(id=worker_node, address=address, kind=kind, devices=list(devices), slots=int(slots),
                    started_at=now, heartbeat_at=now)
    session.add(worker)
    session.commit()
    return worker


def heartbeat_worker(session: Session, *, worker_node: str) -> bool:
    """False when the row is gone (register again)."""
    done = session.execute(
        update(Worker).where(Worker.id == worker_node).values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return done.rowcount == 1


def unregister_worker(session: Session, *, worker_node: str) -> None:
    session.execute(delete(Worker).where(Worker.id == worker_node))
    session.commit()


def live_workers(session: Session, *, stale_seconds: float) -> list[Worker]:
    cutoff = utcnow() - timedelta(seconds=stale_seconds)
    workers = session.scalars(select(Worker).where(Worker.heartbeat_at >= cutoff).order_by(Worker.id)).all()
    session.commit()
    return list(workers)


def node_capacity(worker: Worker) -> int:
    """Devices one node of a job may use on ``worker``."""
    return len(worker.devices)


def resource_errors(session: Session, *, nodes: int, devices: int, stale_seconds: float) -> list[dict[str, Any]]:
    """422 errors for a job of ``nodes`` x ``devices`` that no set of live workers could hold;
    none while no worker is registered (the job waits for workers)."""
    workers = live_workers(session, stale_seconds=stale_seconds)
    if not workers:
        return []
    largest = max(node_capacity(w) for w in workers)
    if devices > largest:
        return [field_error(["body", "resources", "devices"],
                            f"devices {devices} per node: the largest live worker has {largest}", "no_capacity")]
    fitting = sum(1 for w in workers if node_capacity(w) >= devices)
    if nodes > fitting:
        return [field_error(["body", "resources", "nodes"],
                            f"nodes {nodes}: only {fitting} live worker(s) have {devices} device(s) each",
                            "no_capacity")]
    return []


# --------------------------------------------------------------------------- gang lease


@dataclass(frozen=True)
class GangState:
    """What a node's heartbeat learns about its gang. ``alive`` False: the attempt is over (the job
    was requeued, finished or restarted, or this node's slot is gone): stop. ``lost``: node ranks
    whose slot lease expired (their worker died)."""

    alive: bool
    members: int
    nodes: int
    lost: tuple[int, ...] = ()
    cancel_requested: bool = False
    endpoint: str | None = None

    @property
    def complete(self) -> bool:
        return self.alive and self.members == self.nodes and not self.lost


def open_gang(
    session: Session, *, job_id: str, attempt: int, worker_node: str, worker_id: str, endpoint: str,
    lease_seconds: float,
) -> None:
    """Node 0 (the job's lease holder) opens the attempt's gang: slots of older attempts go, its own
    slot carries the rendezvous endpoint."""
    now = utcnow()
    session.execute(delete(JobNode).where(JobNode.job_id == job_id))
    session.add(JobNode(job_id=job_id, attempt=attempt, node_rank=0, worker_node=worker_node, worker_id=worker_id,
                        endpoint=endpoint, lease_expires_at=now + timedelta(seconds=lease_seconds), joined_at=now))
    session.commit()


def _gathering(now: datetime):
    """Running multi-node jobs whose current attempt's gang is open (node 0's slot alive) and not full."""
    members = (
        select(func.count()).select_from(JobNode)
        .where(JobNode.job_id == Job.id, JobNode.attempt == Job.attempts).scalar_subquery()
    )
    leader = (
        select(JobNode.node_rank).where(JobNode.job_id == Job.id, JobNode.attempt == Job.attempts,
                                        JobNode.node_rank == 0, JobNode.lease_expires_at >= now).exists()
    )
    return (Job.status == JobStatus.RUNNING.value, Job.nodes > 1, Job.cancel_requested.is_(False),
            members < Job.nodes, leader)


def joinable_gang(
    session: Session, *, worker_node: str, older_than: tuple[datetime, str] | None = None
) -> tuple[str, int] | None:
    """``(job_id, attempt)`` of the oldest gathering gang ``worker_node`` is not in, or None.

    ``older_than`` is a job's ``(created_at, id)``: only gangs of jobs before it in that order
    (the id breaks ties of equal timestamps, so of two gangs exactly one yields)."""
    now = utcnow()
    mine = select(JobNode.job_id).where(JobNode.worker_node == worker_node, JobNode.attempt == Job.attempts)
    query = select(Job.id, Job.attempts).where(*_gathering(now), Job.id.not_in(mine.scalar_subquery()))
    if older_than is not None:
        created, job_id = older_than
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    row = session.execute(query.order_by(Job.created_at, Job.id).limit(1)).first()
    session.commit()
    return (row[0], int(row[1])) if row else None


def join_gang(
    session: Session, *, job_id: str, attempt: int, worker_node: str, worker_id: str, lease_seconds: float
) -> int | None:
    """Lease a free node slot of the gang; returns its node rank, or None (full, over, or this node
    is in it already). The primary key (job, attempt, rank) lets one worker win each slot."""
    while True:
        job = session.get(Job, job_id, populate_existing=True)
        if job is None or job.status != JobStatus.RUNNING.value or job.attempts != attempt or job.cancel_requested:
            session.commit()
            return None
        taken = set(session.scalars(select(JobNode.node_rank).where(JobNode.job_id == job_id,
                                                                    JobNode.attempt == attempt)))
        free = [r for r in range(1, job.nodes) if r not in taken]
        if 0 not in taken or not free:
            session.commit()
            return None
        now = utcnow()
        session.add(JobNode(job_id=job_id, attempt=attempt, node_rank=free[0], worker_node=worker_node,
                            worker_id=worker_id, lease_expires_at=now + timedelta(seconds=lease_seconds), joined_at=now))
        try:
            session.commit()
            return free[0]
        except IntegrityError:
            session.rollback()
            if session.scalar(select(JobNode.node_rank).where(
                    JobNode.job_id == job_id, JobNode.attempt == attempt, JobNode.worker_node == worker_node)) is not None:
                session.commit()
                return None  # this node is in the gang already
            session.commit()  # another worker took that rank: try the next


def renew_node(
    session: Session, *, job_id: str, attempt: int, node_rank: int, worker_id: str, lease_seconds: float
) -> GangState:
    """The heartbeat of one node of a gang: extend its slot, read the gang's state."""
    now = utcnow()
    renewed = session.execute(
        update(JobNode)
        .where(JobNode.job_id == job_id, JobNode.attempt == attempt, JobNode.node_rank == node_rank,
               JobNode.worker_id == worker_id)
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return gang_state(session, job_id=job_id, attempt=attempt, own_slot=renewed.rowcount == 1)


def gang_state(session: Session, *, job_id: str, attempt: int, own_slot: bool = True) -> GangState:
    now = utcnow()
    job = session.get(Job, job_id, populate_existing=True)
    slots = session.scalars(select(JobNode).where(JobNode.job_id == job_id, JobNode.attempt == attempt)).all()
    session.commit()
    if job is None:
        return GangState(alive=False, members=0, nodes=0)
    alive = own_slot and job.status == JobStatus.RUNNING.value and job.attempts == attempt
    endpoint = next((s.endpoint for s in slots if s.node_rank == 0), None)
    lost = tuple(sorted(s.node_rank for s in slots if s.lease_expires_at < now))
    return GangState(alive=alive, members=len(slots), nodes=job.nodes, lost=lost,
                     cancel_requested=bool(job.cancel_requested), endpoint=endpoint)


def leave_gang(session: Session, *, job_id: str, attempt: int, node_rank: int, worker_id: str) -> None:
    session.execute(delete(JobNode).where(JobNode.job_id == job_id, JobNode.attempt == attempt,
                                          JobNode.node_rank == node_rank, JobNode.worker_id == worker_id))
    session.commit()


def release_gang(
    session: Session, *, job_id: str, worker_id: str, cause: str, started: bool, max_attempts: int
) -> str | None:
    """Node 0 gives the job back and frees every slot; returns the job's new status, or None when
    ``worker_id`` no longer held it.

    A gang that never started (gang timeout, or yielding to an older gang) spends no attempt: the
    attempt row opened by the claim is removed and the count restored. One that started (a node
    was lost, the training crashed) ends its attempt with ``cause`` and is queued again while
    attempts are left (its next gang resumes from the checkpoint), else failed."""
    now = utcnow()
    held = (Job.lease_owner == worker_id,)
    release = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
    job = session.get(Job, job_id, populate_existing=True)
    attempt = job.attempts if job is not None else 0
    if job is None or job.lease_owner != worker_id or job.status != JobStatus.RUNNING.value:
        session.commit()
        return None
    if job.cancel_requested:
        moved, status = set_job_status(session, job_id=job_id, status=JobStatus.CANCELLED, where=held,
                                       finished_at=now, **release), JobStatus.CANCELLED
    elif not started:
        moved, status = set_job_status(session, job_id=job_id, status=JobStatus.QUEUED, where=held,
                                       attempts=Job.attempts - 1, **release), JobStatus.QUEUED
        if moved:
            session.execute(delete(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.number == attempt))
    elif attempt < max_attempts:
        moved, status = set_job_status(session, job_id=job_id, status=JobStatus.QUEUED, where=held,
                                       **release), JobStatus.QUEUED
    else:
        moved, status = set_job_status(session, job_id=job_id, status=JobStatus.FAILED, where=held, finished_at=now,
                                       error=f"{cause} (after {attempt} attempts)"[:2000], **release), JobStatus.FAILED
    if not moved:
        session.rollback()
        return None
    if started or status == JobStatus.CANCELLED:
        session.execute(
            update(JobAttempt).where(JobAttempt.job_id == job_id, JobAttempt.ended_at.is_(None))
            .values(cause=cause[:2000], ended_at=now).execution_options(synchronize_session=False)
        )
    session.execute(delete(JobNode).where(JobNode.job_id == job_id))
    session.commit()
    return status.value


def clear_gang(session: Session, *, job_id: str) -> None:
    """Drop a finished job's slots (its followers' heartbeats then see the attempt is over)."""
    session.execute(delete(JobNode).where(JobNode.job_id == job_id))
    session.commit()
