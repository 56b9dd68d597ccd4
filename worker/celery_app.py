"""The Celery application of the GID workers.

Start a worker node with ``gid worker`` (or ``celery -A worker.celery_app worker``). Design:

* Broker: Redis at ``settings.redis_url``; queue ``gid.jobs``; task ``gid.run_job(job_id)`` (both
  names live in ``service.queue``).
* No result backend: the job's state lives in the database, the message is only a wake-up call.
* One pool process per job slot (``service.workers.detect_capacity``: ``GID_WORKER_SLOTS``, else one
  per GPU the worker owns, one on CPU) and ``prefetch_multiplier=1``, so a node never hoards messages;
  each job's child sees only the GPUs it holds (``worker.node.DeviceSlots``: ``CUDA_VISIBLE_DEVICES``).
* ``acks_late`` + ``reject_on_worker_lost``: a message is acknowledged only after the task ended,
  so a node that dies mid-job does not lose it.
* ``visibility_timeout`` (Redis redelivers unacknowledged messages after it): long, the job time
  limit plus an hour. Correctness does not rest on it: ``gid.run_job`` first claims a lease in the
  database and drops the message when another worker holds a live lease or the job is finished,
  and the reaper (``worker.reaper``) re-enqueues the jobs of lost workers as soon as their lease
  expires. A short timeout would only make Redis redeliver messages of long jobs that are still
  running (each redelivery is then dropped).
* Time limits: the soft limit (``GID_JOB_TIME_LIMIT_SECONDS``) raises ``SoftTimeLimitExceeded``
  in the task, which stops the training child and fails the job; the hard limit, a little later,
  kills the pool process if that did not work (the lease then expires and the reaper takes over).
* The reaper runs as a thread of every worker's main process (``worker.reaper``), serialised across
  nodes by a Redis lock; no separate beat process is needed.
"""

from __future__ import annotations

from celery import Celery

from service.core.config import settings
from service.queue import JOB_QUEUE, RUN_JOB_TASK
from service.workers import detect_capacity

app = Celery("gid", broker=settings.redis_url, include=["worker.tasks", "worker.reaper", "worker.webhook_sender", "worker.node"])
app.conf.update(
    task_default_queue=JOB_QUEUE,
    task_routes={RUN_JOB_TASK: {"queue": JOB_QUEUE}},
    task_serializer="json",
    accept_content=["json"],
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_acks_on_failure_or_timeout=True,  # a task that raised has already failed its job
    task_ignore_result=True,
    task_store_errors_even_if_ignored=False,
    result_backend=None,
    worker_prefetch_multiplier=1,
    worker_concurrency=detect_capacity(settings).slots,  # one pool process per job slot (worker.node.DeviceSlots)
    # A lost broker connection must not kill a training run: the lease keeps the job consistent.
    worker_cancel_long_running_tasks_on_connection_loss=False,
    worker_send_task_events=False,
    task_send_sent_event=False,
    task_soft_time_limit=settings.job_time_limit_seconds,
    task_time_limit=int(settings.job_time_limit_seconds + settings.cancel_grace_seconds + 60),
    broker_transport_options={"visibility_timeout": settings.broker_visibility_timeout_seconds},
    broker_connection_retry_on_startup=True,
)
