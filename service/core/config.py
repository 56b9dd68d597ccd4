"""The settings of every GID process (API, CLI and worker), read once from ``GID_*`` environment variables.

``settings`` is the process-wide singleton the CLI and the worker use; the API takes a ``Settings``
in ``create_app(settings)`` so tests can run several apps side by side. Fields are grouped by who
reads them; a process ignores the groups it does not use.

List settings take JSON in the environment: ``GID_DATA_ROOTS='["/datasets", "/mnt/coco"]'``.
Outside ``env="local"`` the default secret key is refused: a production deployment must set
``GID_SECRET_KEY`` (it keys the token hashes, so every process of one deployment needs the same one).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_SECRET_KEY = "gid-local-development-secret-do-not-use-in-production"
MiB = 1024 * 1024
HOUR = 3600


def usable_cpus() -> int:
    """The cores this process may run on (a container's cpuset, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GID_", extra="ignore", validate_default=True)

    # Every process: where the deployment keeps its state.
    env: Literal["local", "production"] = "local"
    secret_key: str = Field(DEFAULT_SECRET_KEY, min_length=16, description="HMAC key of API token hashes")

    data_dir: Path = Field(Path("data"), description="datasets, models and job outputs live here")
    database_url: str = Field("", description="SQLAlchemy URL; empty means sqlite:///<data_dir>/gid.db")
    redis_url: str = "redis://localhost:6379/0"
    data_roots: list[Path] = Field(
        default_factory=list, description="server folders datasets may be registered from by path"
    )

    # The API: request limits.
    max_upload_bytes: int = Field(4096 * MiB, ge=1, description="largest uploaded file (zip, checkpoint)")
    max_annotation_bytes: int = Field(1024 * MiB, ge=1, description="largest uploaded annotation JSON")
    max_json_body_bytes: int = Field(4 * MiB, ge=1, description="largest non-upload request body")
    max_unzipped_bytes: int = Field(32 * 1024 * MiB, ge=1, description="total extracted size of an images zip")
    max_zip_members: int = Field(2_000_000, ge=1)
    max_zip_ratio: float = Field(200.0, gt=1.0, description="largest compression ratio of one zip member")
    max_devices: int = Field(8, ge=1, le=64, description="largest DDP world size a job may ask for")

    # The API: job limits (engineer B), with max_devices above. What one job may ask of this
    # deployment's GPUs; the engine's own bounds (gid_core.config) hold for any machine and are
    # wider. service.jobspec refuses a job beyond one with a 422 naming the field and the setting.
    max_iters: int = Field(
        1_000_000, ge=1, le=2**31 - 1,
        description="longest job, in iterations (also bounds warmup_iters and the log/checkpoint/eval periods)",
    )
    max_batch_per_device: int = Field(32, ge=1, le=4096, description="largest batch_size / devices")
    max_image_size: int = Field(
        2048, ge=32, le=8192, description="largest min_size and max_size of a job's student and teacher"
    )
    max_num_workers: int = Field(16, ge=0, le=64, description="most data-loading processes per device")

    # The API: broker (engineer D). A hung Redis must not hang requests: the job stays queued and
    # the reaper's sweep sends it later (service.queue); /readyz reports the broker as down.
    broker_timeout_seconds: float = Field(
        2.0, gt=0, le=30, description="longest wait on Redis when the API enqueues a job or checks readiness"
    )
    database_check_timeout_seconds: float = Field(
        2.0, gt=0, le=30, description="longest wait on the database in the readiness check"
    )

    # The API: processes (engineer D). `gid serve` and `gid up` run this many uvicorn workers.
    api_workers: int = Field(
        default_factory=lambda: usable_cpus(), ge=1, le=256, description="API processes (default: usable CPU cores)"
    )

    # The API: dashboard's general-instances view (engineer G). GET /v1/jobs/{id}/instances runs
    # teacher and student in the API process on the CPU: bounded to small models and a few images.
    inspect_max_checkpoint_bytes: int = Field(
        256 * 1024 * 1024, ge=0, description="largest checkpoint (teacher weights too) the API inspects; 0: off"
    )
    inspect_max_images: int = Field(8, ge=1, le=64, description="validation images the GI view offers per job")

    # Retention (engineer D): what is kept of a finished job's folder.
    keep_checkpoints_after_success: bool = Field(
        False, description="keep checkpoints/ of a succeeded job (its export, metrics and logs are always kept)"
    )

    # Weights (engineer A): torchvision's published weights by name resolve in torch's hub cache,
    # <torch_home>/hub/checkpoints/<torchvision's file name>. The API and the worker's training
    # child set TORCH_HOME to it (the user's own environment does not decide). Offline by default:
    # a job naming a file not in the cache is refused at submission; `gid weights import` or
    # PUT /v1/weights/{name} places one (hash-checked).
    torch_home: Path | None = Field(None, description="TORCH_HOME of the service; None: <data_dir>/torch")
    allow_weights_download: bool = Field(
        False, description="let the worker fetch a missing weights file from torchvision's URL (hash-checked)"
    )

    # Workers: the job lease (service.leases) and the reaper.
    job_lease_seconds: int = Field(60, ge=5, description="a worker's lease on a running job")
    job_heartbeat_seconds: int = Field(15, ge=1, description="how often a worker renews its lease")
    job_requeue_after_seconds: int = Field(120, ge=1, description="re-enqueue jobs queued this long")
    max_attempts: int = Field(
        3, ge=1, description="runs of a job (a lost worker or a crashed training starts another) before it fails"
    )
    reaper_period_seconds: float = Field(
        30.0, gt=0, description="how often a worker looks for stale running jobs and forgotten queued jobs"
    )

    # Workers: retries. A training that ends abnormally (a rank killed by the OOM killer, a crash)
    # restarts from its newest checkpoint, while the job has attempts left (``max_attempts``);
    # deterministic errors (bad config or data, non-finite loss) fail the job at once.
    retry_backoff_seconds: float = Field(
        2.0, ge=0, le=300, description="wait before restarting a crashed training, doubled each retry"
    )
    deterministic_errors: list[str] = Field(
        default_factory=lambda: [
            # A failed DDP rank reports only its exception's own class: name the subclasses too.
            "ProblemsError", "DatasetValidationError", "JobSetupError", "ConfigFileError", "ValidationError",
            "FloatingPointError", "TrainingCancelled",
        ],
        description="exception types (a class or any base class) a retry cannot fix: the job fails at once",
    )

    # Workers: supervising a running job.
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

    # Events, logs and webhooks (engineer E). ``GET /v1/jobs/{id}/events`` and ``/logs?follow=true``
    # poll the database and the log file (no pub/sub to deploy); the worker's sweeper sends the
    # terminal-state webhooks (service.webhooks), signed with HMAC-SHA256 when a secret is set.
    events_poll_seconds: float = Field(
        0.5, gt=0, le=10, description="how often an open event or log stream looks for news"
    )
    events_keepalive_seconds: float = Field(
        15.0, gt=0, le=300, description="an idle event stream sends a comment this often (proxies drop silent ones)"
    )
    webhook_secret: str | None = Field(
        None, min_length=16,
        description="HMAC-SHA256 key of the X-GID-Signature-256 header of webhook calls; unset: calls are unsigned",
    )
    webhook_timeout_seconds: float = Field(5.0, gt=0, le=60, description="longest wait for one webhook call")
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="calls of a webhook before it is given up")
    webhook_backoff_seconds: float = Field(
        5.0, ge=0, le=3600, description="wait before calling a failed webhook again, doubled each time"
    )
    webhook_poll_seconds: float = Field(2.0, gt=0, le=300, description="how often a worker looks for webhooks to send")

    # Webhook targets (engineer M; service.webhooks). A job's URL is chosen by its submitter but
    # called from inside the cluster: by default only public addresses are called (checked at
    # submission for IP literals and after name resolution at delivery), never redirects.
    webhook_allow_private: bool = Field(
        False, description="let webhooks call private, loopback, link-local, multicast and unspecified addresses"
    )

    # Prometheus and experiments (engineer L; service.prometheus, service.experiments). /metrics
    # shows counts and worker node names only: open unless a token is set.
    metrics_enabled: bool = Field(True, description="serve GET /metrics (Prometheus text format)")
    metrics_token: str | None = Field(
        None, min_length=16, description="when set, GET /metrics needs 'Authorization: Bearer <this token>'"
    )

    # Workers: capacity and multi-node jobs (engineer H, issue 11; service.workers, worker.node).
    # A worker registers what it owns and heartbeats it; the API refuses a job no set of live
    # workers could hold (while none is registered, jobs are accepted and wait in the queue).
    worker_devices: str | None = Field(
        None, description="GPU ids this worker owns, e.g. '0,1' (its jobs' CUDA_VISIBLE_DEVICES); "
                          "None: CUDA_VISIBLE_DEVICES or every visible GPU; '' or no GPU: a CPU worker",
    )
    worker_cpu_devices: int = Field(8, ge=1, le=64, description="DDP processes one node of a job may run on a CPU worker")
    worker_slots: int | None = Field(
        None, ge=1, le=64, description="jobs a worker runs at once; None: 1 on CPU, one per GPU on CUDA"
    )
    worker_address: str | None = Field(
        None, description="host its peers reach this worker at (rendezvous); None: this machine's host name"
    )
    max_nodes: int = Field(8, ge=1, le=64, description="most worker nodes one job may span")
    gang_timeout_seconds: float = Field(
        120.0, gt=0, description="a multi-node job gathers its nodes this long, then releases them and waits queued"
    )
    rendezvous_timeout_seconds: int = Field(
        60, ge=5, description="torch elastic rendezvous timeout; also bounds a collective of a multi-node job"
    )

    @model_validator(mode="after")
    def _resolve(self) -> "Settings":
        if self.env != "local" and self.secret_key == DEFAULT_SECRET_KEY:
            raise ValueError(f"GID_SECRET_KEY must be set when GID_ENV={self.env!r} (the default is public)")
        if self.env != "local" and len(self.secret_key) < 32:
            raise ValueError("GID_SECRET_KEY must be at least 32 characters outside GID_ENV=local")
        if self.job_heartbeat_seconds * 2 > self.job_lease_seconds:
            raise ValueError("job_heartbeat_seconds must be at most half of job_lease_seconds")
        self.data_dir = self.data_dir.expanduser().absolute()
        self.torch_home = (self.torch_home or self.data_dir / "torch").expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'gid.db'}"
        self.data_roots = [root.expanduser().resolve() for root in self.data_roots]
        if self.broker_visibility_timeout_seconds is None:
            # The lease, not the broker, decides who runs a job: a redelivered message for a job
            # whose lease is alive is dropped, and the reaper re-enqueues jobs of lost workers
            # within a lease period. So the only job of this timeout is to bring back a message
            # that was lost with its worker, and a long one avoids pointless redeliveries while a
            # long job runs.
            self.broker_visibility_timeout_seconds = self.job_time_limit_seconds + HOUR
        return self


settings = Settings()
