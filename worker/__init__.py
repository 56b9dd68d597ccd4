"""Celery workers that lease training jobs from the database and run them as DDP child processes.

``worker.celery_app``  the Celery application (Redis broker, queue ``gid.jobs``, one job per node)
``worker.tasks``       task ``gid.run_job``: claim the job's lease, supervise the training child
``worker.runner``      ``python -m worker.runner``: the training child (``gid_core`` DDP ranks)
``worker.reaper``      requeues jobs whose worker was lost and re-enqueues forgotten queued jobs
``worker.config``      worker-only settings (``GID_*`` environment variables)
"""
