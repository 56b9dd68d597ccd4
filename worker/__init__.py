"""Celery workers that lease training jobs from the database and run them as DDP child processes.

Settings come from ``service.core.config.settings``, the lease protocol from ``service.leases``,
the queue and task names from ``service.queue``.

``worker.celery_app``  the Celery application (Redis broker, queue ``gid.jobs``, one job per node)
``worker.tasks``       task ``gid.run_job``: claim the job's lease, supervise the training child
``worker.runner``      ``python -m worker.runner``: the training child (``gid_core`` DDP ranks)
``worker.reaper``      requeues jobs whose worker was lost and re-enqueues forgotten queued jobs
"""
