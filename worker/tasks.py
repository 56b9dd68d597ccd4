"""Task ``gid.run_job(job_id)``: lease the job, supervise its training child, record the outcome.

A job message is only a wake-up call; the job row decides:

1. ``leases.claim_next_job`` takes the lease of the oldest queued job, else of the message's own
   job (owner ``<node name>:pid:uuid``, expiry ``job_lease_seconds``): jobs run in submission
   order even when a requeued job's message is behind newer ones. None means nothing is
   claimable (finished, cancelled, or running under another worker's live lease: a redelivered
   or duplicated message): the message is dropped.
2. The claimed job runs on this worker's own devices (``worker.node.run_claimed``), supervised by
   ``worker.supervisor.JobSupervisor`` (child process, lease heartbeats, cancel, retries, outcome);
   a multi-node job's other nodes join its gang first (``worker.node.join_any_gang``).
"""

from __future__ import annotations

import logging

from service import leases
from service.core.config import settings
from service.queue import RUN_JOB_TASK
from worker import node
from worker.celery_app import app
from worker.supervisor import db_call, make_worker_id

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the task


@app.task(name=RUN_JOB_TASK, bind=True)
def run_job(self, job_id: str) -> str:
    """Run job ``job_id`` if it can be claimed; returns what happened (for the worker log)."""
    worker_id = make_worker_id(self.request.hostname)
    # multi-node jobs first: join the oldest gang that is gathering nodes
    joined = node.join_any_gang(self.request.hostname, worker_id)
    if joined is not None:
        return joined
    job = db_call(
        leases.claim_next_job, job_id=job_id, worker_id=worker_id, lease_seconds=settings.job_lease_seconds,
        max_attempts=settings.max_attempts,
    )
    if job is None:
        current = db_call(leases.get_job, job_id=job_id)
        state = "unknown job" if current is None else f"status {current.status}, lease owner {current.lease_owner}"
        redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
        logger.info("job %s not claimable (%s; redelivered=%s): message dropped", job_id, state, redelivered)
        return "dropped"
    if job.id != job_id:
        logger.info("job %s: the message ran the older job %s first", job_id, job.id)
    logger.info("job %s claimed by %s (attempt %d)", job.id, worker_id, job.attempts)
    return node.run_claimed(job, worker_id, worker_node=self.request.hostname)  # on devices of its own
