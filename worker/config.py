"""Worker-only settings, read from ``GID_*`` environment variables like ``service.core.config``.

The lease, heartbeat, requeue and attempt settings the API also needs live in
``service.core.config.Settings``; these are the ones only a worker node reads.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

HOUR = 3600


class WorkerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GID_", extra="ignore", validate_default=True)

    reaper_period_seconds: float = Field(
        30.0, gt=0, description="how often a worker looks for stale running jobs and forgotten queued jobs"
    )
    cancel_poll_seconds: float = Field(
        1.0, gt=0, description="how often rank 0 of a running job reads its cancel flag from the database"
    )
    cancel_grace_seconds: float = Field(
        30.0, gt=0, description="after a cancel request, how long training may take to stop before it is killed"
    )
    progress_interval_seconds: float = Field(
        1.0, ge=0, description="least time between two progress writes of a running job"
    )
    job_time_limit_seconds: int = Field(
        7 * 24 * HOUR, ge=60, description="a job still running after this long is stopped and failed"
    )
    broker_visibility_timeout_seconds: int | None = Field(
        None,
        ge=60,
        description="Redis redelivers an unacknowledged message after this long; None: job time limit + 1 h",
    )

    @model_validator(mode="after")
    def _resolve(self) -> "WorkerSettings":
        if self.broker_visibility_timeout_seconds is None:
            # The lease, not the broker, decides who runs a job: a redelivered message for a job
            # whose lease is alive is dropped, and the reaper re-enqueues jobs of lost workers
            # within a lease period. So the only job of this timeout is to bring back a message
            # that was lost with its worker, and a long one avoids pointless redeliveries while a
            # long job runs.
            self.broker_visibility_timeout_seconds = self.job_time_limit_seconds + HOUR
        return self


worker_settings = WorkerSettings()
