"""Hand a committed job to the workers: one Celery message on the Redis broker.

The queue and task names live here, the one place both sides read them: the service sends the task
by name (it does not import ``worker/``), and ``worker.celery_app`` registers it under the same name.

The API enqueues only after the job row is committed, so a worker never receives an id it cannot
find. The database, not the broker, is the source of truth: if the broker is down the job simply
stays ``queued`` and the worker side's sweep (``leases.list_queued_job_ids``) sends it again later;
a message delivered twice is harmless because ``leases.claim_job`` lets only one worker run a job.

Sending is bounded in time: a Redis that accepts connections but never answers (stopped, swapping,
a dead network path) costs the request at most about ``broker_timeout_seconds``, never a retry
loop: one attempt with short connect and read timeouts, and the sweep does the retrying.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery

from service.core.config import settings

JOB_QUEUE = "gid.jobs"  # the Redis list the workers consume
RUN_JOB_TASK = "gid.run_job"  # run_job(job_id): the one task of the workers

log = logging.getLogger(__name__)
_apps: dict[tuple[str, float], Celery] = {}
_apps_lock = threading.Lock()


def _producer_app(broker_url: str, timeout: float) -> Celery:
    with _apps_lock:
        app = _apps.get((broker_url, timeout))
        if app is None:
            app = Celery("gid-service-producer", broker=broker_url)
            app.conf.update(
                broker_connection_timeout=timeout,
                broker_connection_retry_on_startup=False,
                broker_connection_max_retries=0,
                # Both timeouts: a stopped Redis accepts the TCP connection (the kernel does) and
                # then never answers, so only the read timeout ends the wait.
                broker_transport_options={"socket_connect_timeout": timeout, "socket_timeout": timeout},
                task_serializer="json",
            )
            _apps[(broker_url, timeout)] = app
        return app


def enqueue_job(job_id: str, *, broker_url: str | None = None, timeout: float | None = None) -> bool:
    """Send ``gid.run_job(job_id)`` to the ``gid.jobs`` queue in one attempt bounded by ``timeout``
    seconds (default ``settings.broker_timeout_seconds``); False (logged) if the broker failed."""
    timeout = settings.broker_timeout_seconds if timeout is None else timeout
    try:
        _producer_app(broker_url or settings.redis_url, timeout).send_task(
            RUN_JOB_TASK, args=[job_id], queue=JOB_QUEUE, retry=False
        )
    except Exception as e:  # noqa: BLE001 - any broker failure leaves the job queued for the sweep
        log.warning("could not enqueue job %s (%s: %s); it stays queued and the sweep will send it again",
                    job_id, type(e).__name__, e)
        return False
    return True
