"""The reaper: brings back jobs whose worker was lost and queued jobs whose message was lost.

``reap(session)`` does one sweep:

1. ``leases.requeue_or_fail_stale_jobs``: running jobs whose lease expired go back to ``queued``
   (their next attempt resumes from the newest checkpoint), or to ``failed`` after
   ``max_attempts`` lost workers; each requeued job gets a fresh message at once.
2. Jobs ``queued`` for longer than ``job_requeue_after_seconds`` whose id is not waiting in the
   broker queue (the API could not reach Redis, Redis lost its data, ...) are enqueued again.
   Looking into the queue first keeps a long backlog from being multiplied every sweep; a
   duplicate that slips through anyway is harmless (``claim_job`` lets one worker run a job).
3. Experiments whose teacher's training job has finished get their GID job
   (``service.experiments.advance_waiting``), for when nobody reads them through the API.

Where it runs: a daemon thread in the main process of every worker node, started by Celery's
``worker_ready`` signal and stopped by ``worker_shutdown``, sweeping every
``GID_REAPER_PERIOD_SECONDS``. A Redis lock (``SET NX PX``) lets one node sweep per period, so
adding workers adds no load; no separate beat process has to be deployed and kept single.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime

from celery.signals import worker_ready, worker_shutdown
from sqlalchemy.orm import Session

from service import experiments, leases
from service.core.config import settings
from service.queue import JOB_QUEUE, RUN_JOB_TASK, enqueue_job

logger = logging.getLogger(__name__)

LOCK_KEY = "gid:reaper:lock"


@dataclass
class ReapReport:
    requeued: list[str] = field(default_factory=list)  # stale running jobs sent back to the queue
    failed: list[str] = field(default_factory=list)  # stale running jobs out of attempts
    reenqueued: list[str] = field(default_factory=list)  # queued jobs whose message was missing
    enqueue_failed: list[str] = field(default_factory=list)  # the broker refused (retried next sweep)
    released: list[str] = field(default_factory=list)  # GID jobs of experiments whose teacher trained


def job_ids_in_queue(client, queue: str = JOB_QUEUE) -> set[str]:
    """Ids of the ``gid.run_job`` messages waiting in the Redis list of ``queue``.

    kombu's Redis transport keeps a queue as a list of JSON envelopes whose ``body`` is the
    base64 of Celery's protocol-2 body ``[args, kwargs, embed]``.
    """
    ids: set[str] = set()
    for raw in client.lrange(queue, 0, -1):
        try:
            envelope = json.loads(raw)
            if envelope.get("headers", {}).get("task") != RUN_JOB_TASK:
                continue
            body = envelope["body"]
            if envelope.get("properties", {}).get("body_encoding") == "base64":
                body = base64.b64decode(body)
            args = json.loads(body)[0]
            ids.add(str(args[0]))
        except (ValueError, KeyError, IndexError, TypeError):
            logger.debug("unreadable message in %s skipped", queue)
    return ids


def reap(
    session: Session,
    *,
    now: datetime | None = None,
    max_attempts: int | None = None,
    requeue_after_seconds: float | None = None,
    redis_client=None,
    enqueue: Callable[[str], bool] = enqueue_job,
) -> ReapReport:
    """One sweep (see the module docstring). Without ``redis_client`` the queue is not inspected
    and every queued job older than ``requeue_after_seconds`` is enqueued again."""
    report = ReapReport()
    report.requeued, report.failed = leases.requeue_or_fail_stale_jobs(
        session, now=now, max_attempts=max_attempts or settings.max_attempts
    )
    for job_id in report.failed:
        logger.warning("job %s failed: its worker was lost %d times", job_id, max_attempts or settings.max_attempts)
    _send(report.requeued, report, enqueue, what="requeued (worker lost)")

    waiting = leases.list_queued_job_ids(
        session,
        older_than_seconds=settings.job_requeue_after_seconds if requeue_after_seconds is None else requeue_after_seconds,
    )
    in_queue = job_ids_in_queue(redis_client) if redis_client is not None and waiting else set()
    forgotten = [j for j in waiting if j not in in_queue and j not in report.requeued]
    _send(forgotten, report, enqueue, what="re-enqueued (no message in the queue)", into=report.reenqueued)
    # Experiments whose teacher's training job finished: their GID job (service.experiments).
    released = experiments.advance_waiting(session, settings=settings)
    _send(released, report, enqueue, what="created by its experiment (teacher trained)", into=report.released)
    return report


def _send(job_ids: Iterable[str], report: ReapReport, enqueue: Callable[[str], bool], *, what: str,
          into: list[str] | None = None) -> None:
    for job_id in job_ids:
        if enqueue(job_id):
            logger.info("job %s %s", job_id, what)
            if into is not None:
                into.append(job_id)
        else:
            report.enqueue_failed.append(job_id)


# --------------------------------------------------------------------------- the thread


class ReaperThread(threading.Thread):
    """Sweeps every ``period`` seconds (with jitter) while holding the cluster-wide Redis lock."""

    def __init__(self, *, period: float, redis_url: str) -> None:
        super().__init__(name="gid-reaper", daemon=True)
        self.period = period
        self.redis_url = redis_url
        self.stopped = threading.Event()

    def run(self) -> None:
        import redis

        from service.core.db import make_engine, make_session_factory, session_scope

        client = redis.Redis.from_url(self.redis_url, socket_timeout=10, socket_connect_timeout=5)
        engine = make_engine(settings.database_url)
        factory = make_session_factory(engine)
        logger.info("reaper started (every %.1f s)", self.period)
        try:
            while not self.stopped.is_set():
                try:
                    # The lock expires a little before the next sweep of any node is due.
                    if client.set(LOCK_KEY, "1", nx=True, px=max(int(self.period * 900), 1)):
                        with session_scope(factory) as session:
                            reap(session, redis_client=client)
                except Exception:
                    logger.exception("reaper sweep failed (retrying next period)")
                self.stopped.wait(self.period * random.uniform(0.9, 1.1))
        finally:
            engine.dispose()
            client.close()

    def stop(self) -> None:
        self.stopped.set()


_thread: ReaperThread | None = None


@worker_ready.connect
def _start_reaper(**_kwargs) -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = ReaperThread(period=settings.reaper_period_seconds, redis_url=settings.redis_url)
        _thread.start()


@worker_shutdown.connect
def _stop_reaper(**_kwargs) -> None:
    if _thread is not None:
        _thread.stop()
