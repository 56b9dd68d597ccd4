"""Supervising one claimed job on this worker: its child process, lease and outcome.

``JobSupervisor`` is what ``worker.tasks.run_job`` (single-node jobs) and ``worker.node`` (every
node of a multi-node job) run once a job is claimed:

1. The training runs in a child process (``python -m worker.runner``, its own session) that spawns
   the job's DDP ranks; the Celery process never imports torch. Its output goes to
   ``<output_dir>/logs/attempt-<n>.log`` (the folder's layout: ``gid_core.jobdir``).
2. While it runs, the supervisor renews the lease every ``job_heartbeat_seconds``. A lost lease (the
   reaper requeued the job, or it was finished elsewhere) or a database unreachable for nearly a
   lease period kills the child at once: another worker may take the job over. A cancel request is
   seen by rank 0 itself (it reads the flag, all ranks stop after the same iteration and
   checkpoint); the supervisor only kills the child if it has not exited ``cancel_grace_seconds`` later.
   An evaluation job (``kind: evaluate``, ``service.evaluate``) runs the same way, its child
   started with ``--evaluate`` on the job's ``EvalConfig``; cancelled, it is killed as soon as the
   request is seen (it has no checkpoint to save).
3. The outcome: completed -> the export becomes a model (``crud.create_model``), the export,
   metrics, newest checkpoint and log are registered as artifacts with their sha256, and the job
   ``succeeded`` with its final COCO metrics; cancelled -> ``cancelled``; anything else ->
   ``failed`` with one line, the exception type and message (the traceback is in the attempt's
   log, registered as an artifact).
4. Retries: a training that ended abnormally (killed by a signal, such as the OOM killer's
   SIGKILL of a rank; exited without a result; an exception whose type is not in
   ``settings.deterministic_errors``) is started again under the same lease, from its newest
   checkpoint, after ``retry_backoff_seconds`` (doubled each time), while the job has attempts
   left (``max_attempts``). Each attempt is a ``JobAttempt`` row with its cause.

A job picked up again after its worker was lost continues from its newest checkpoint (the child
runs the engine with ``resume=True`` on the same output directory).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from gid_core.config import EvalConfig, JobConfig
from gid_core.fileio import read_json, sha256_file, write_json_atomic
from gid_core.jobdir import JobDir
from gid_core.processes import die_with_parent, kill_process_group
from service import crud, leases
from service.core.config import settings
from service.core.db import make_engine, make_session_factory, session_scope
from service.models import Job
from service.status import JobStatus
from service.storage import Storage

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.5  # how often the supervisor looks at the child between heartbeats
KILL_WAIT_SECONDS = 10.0  # SIGTERM -> SIGKILL
MAX_ERROR_CHARS = 2000

# --------------------------------------------------------------------------- database access

_factory: tuple[int, sessionmaker[Session]] | None = None


def session_factory() -> sessionmaker[Session]:
    """This process's session factory (a forked pool process must not reuse its parent's pool)."""
    global _factory
    if _factory is None or _factory[0] != os.getpid():
        _factory = (os.getpid(), make_session_factory(make_engine(settings.database_url)))
    return _factory[1]


def db_call(fn, /, **kwargs) -> Any:
    """``fn(session, **kwargs)`` in a fresh session (each crud function is its own transaction)."""
    with session_scope(session_factory()) as session:
        return fn(session, **kwargs)


def make_worker_id(node_name: str | None = None) -> str:
    """``<node>:<pid>:<random>``; the node name (Celery's ``--hostname``) first, so whoever
    started a worker node can requeue its jobs when the node dies (``leases.requeue_jobs_of_worker``)."""
    return f"{node_name or socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


@worker_process_init.connect
def _die_with_the_worker(**_kwargs) -> None:
    """A pool process must not outlive the worker's main process: it would go on supervising a
    job that nobody can see any more. (Its training child dies with it in turn.)"""
    die_with_parent()


def _one_line(text: str) -> str:
    return " ".join(text.split())


def child_env() -> dict[str, str]:
    """The environment of a training child (``worker.runner``, or a node's ``torchrun``)."""
    env = dict(os.environ)
    env["TORCH_HOME"] = str(settings.torch_home)  # torchvision weights by name resolve in the service's cache
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Outcome:
    """How the child ended, as the supervisor saw it."""

    returncode: int | None
    lease_lost: bool = False
    killed_after_cancel: bool = False
    timed_out: bool = False
    node_lost: str | None = None  # a multi-node job lost a peer node (worker.node)


class JobSupervisor:
    """Runs one claimed job's training child and turns its outcome into the job's final state."""

    def __init__(self, job: Job, worker_id: str) -> None:
        self.job = job
        self.job_id = job.id
        self.worker_id = worker_id
        self.job_dir = JobDir(Storage(settings.data_dir).job_dir(job.id))
        self.config_path = self.job_dir.config
        self.proc: subprocess.Popen | None = None
        self.retries = 0
        self.device_env: dict[str, str] = {}  # CUDA_VISIBLE_DEVICES: the GPUs this job holds (worker.node)
        self.evaluate = job.kind == "evaluate"  # an EvalConfig: metrics only, no model comes out
        self._set_attempt(int(job.attempts))

    def _set_attempt(self, attempt: int) -> None:
        self.attempt = attempt
        self.log_path = self.job_dir.attempt_log(attempt)
        self.result_path = self.job_dir.attempt_result(attempt)

    # ----------------------------------------------------------------------- run

    def run(self) -> str:
        try:
            engine_model = EvalConfig if self.evaluate else JobConfig
            config = engine_model.model_validate(self.job.engine_config)
        except ValidationError as e:
            return self._finish(JobStatus.FAILED, error=f"invalid engine config: {_one_line(str(e))}")
        self.job_dir.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.config_path, config.model_dump(mode="json"))
        while True:
            self.result_path.unlink(missing_ok=True)
            try:
                self._start_child()
                outcome = self._supervise()
            except SoftTimeLimitExceeded:
                self._kill_child()
                return self._time_limit_exceeded()
            except BaseException:
                self._kill_child()
                raise
            cause = self._retry_cause(outcome)
            if cause is None or not self._restart(cause):
                return self._conclude(outcome)

    # ----------------------------------------------------------------------- retries

    def _retry_cause(self, outcome: Outcome) -> str | None:
        """Why the training ended abnormally, if a new attempt may fix it; None when it ended
        normally, deterministically (by exception type), was cancelled, or the lease is gone."""
        if outcome.lease_lost or outcome.killed_after_cancel:
            return None
        if outcome.node_lost:
            return outcome.node_lost
        result = read_json(self.result_path) or {}
        if result.get("status") in ("completed", "cancelled") or self._cancel_requested():
            return None
        if set(result.get("error_types") or ()) & set(settings.deterministic_errors):
            return None
        return self._failure_head(outcome, result)

    def _restart(self, cause: str) -> bool:
        """Open the next attempt under our lease and wait the back-off; False when out of attempts."""
        self._register_leftovers()
        attempt = db_call(
            leases.restart_attempt, job_id=self.job_id, worker_id=self.worker_id, cause=cause,
            lease_seconds=settings.job_lease_seconds, max_attempts=settings.max_attempts,
        )
        if attempt is None:
            return False
        # restart_attempt renewed the lease: a pause under half of it needs no heartbeat.
        delay = min(settings.retry_backoff_seconds * 2**self.retries, settings.job_lease_seconds / 2)
        self.retries += 1
        logger.warning("job %s: attempt %d ended abnormally (%s); attempt %d starts in %.1f s from the newest "
                       "checkpoint", self.job_id, self.attempt, cause, attempt, delay)
        time.sleep(delay)
        self._set_attempt(attempt)
        return True

    def _start_child(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "worker.runner",
            "--config", str(self.config_path),
            "--output-dir", str(self.job_dir.root),
            "--result", str(self.result_path),
            "--job-id", self.job_id,
            "--worker-id", self.worker_id,
            "--attempt", str(self.attempt),
            "--parent-pid", str(os.getpid()),
            "--cancel-poll-seconds", str(settings.cancel_poll_seconds),
            "--progress-interval-seconds", str(settings.progress_interval_seconds),
        ]
        if settings.allow_weights_download:
            cmd.append("--allow-weights-download")
        if self.evaluate:
            cmd.append("--evaluate")
        env = {**child_env(), **self.device_env}
        with open(self.log_path, "ab") as log:
            # Its own session: the supervisor can stop the runner and all its ranks with one killpg.
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=str(self.job_dir.root), start_new_session=True,
            )
        logger.info("job %s: training child pid %d, log %s", self.job_id, self.proc.pid, self.log_path)

    def _supervise(self) -> Outcome:
        assert self.proc is not None
        heartbeat = float(settings.job_heartbeat_seconds)
        # Stop before the lease can expire when renewals keep failing: someone may take over then.
        unreachable_limit = max(float(settings.job_lease_seconds) - heartbeat, heartbeat)
        last_renewed = next_beat = time.monotonic()
        cancel_seen: float | None = None
        # Training stops at its next iteration and saves a checkpoint; an evaluation has nothing to
        # save and no iteration to stop at, so it is stopped as soon as the request is seen.
        cancel_grace = 0.0 if self.job.kind == "evaluate" else settings.cancel_grace_seconds
        while True:
            try:
                return Outcome(self.proc.wait(timeout=POLL_SECONDS))
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if now >= next_beat:
                next_beat = now + heartbeat
                try:
                    state = db_call(
                        leases.renew_lease, job_id=self.job_id, worker_id=self.worker_id,
                        lease_seconds=settings.job_lease_seconds,
                    )
                except Exception:
                    logger.warning("job %s: lease renewal failed", self.job_id, exc_info=True)
                    state = None
                if state is not None and not state.alive:
                    logger.warning("job %s: lease lost; stopping the training child", self.job_id)
                    self._kill_child()
                    return Outcome(self.proc.returncode, lease_lost=True)
                if state is None and now - last_renewed > unreachable_limit:
                    logger.error("job %s: database unreachable for %.0f s; stopping", self.job_id, now - last_renewed)
                    self._kill_child()
                    return Outcome(self.proc.returncode, lease_lost=True)
                if state is not None:
                    last_renewed = now
                    if state.cancel_requested and cancel_seen is None:
                        logger.info("job %s: cancel requested", self.job_id)
                        cancel_seen = now
                lost = self._node_lost()
                if lost is not None:
                    logger.warning("job %s: %s; stopping the training child", self.job_id, lost)
                    self._kill_child()
                    return Outcome(self.proc.returncode, node_lost=lost)
            if cancel_seen is not None and now - cancel_seen >= cancel_grace:
                logger.warning("job %s: still running %.0f s after the cancel request; killing it",
                               self.job_id, now - cancel_seen)
                self._kill_child()
                return Outcome(self.proc.returncode, killed_after_cancel=True)

    def _node_lost(self) -> str | None:
        """Why a peer node of this job is gone (multi-node jobs: ``worker.node.GangLeader``)."""
        return None

    def _kill_child(self) -> None:
        """SIGTERM the child's whole process group, then SIGKILL whatever is left."""
        if self.proc is not None:
            kill_process_group(self.proc, grace_seconds=KILL_WAIT_SECONDS)

    # ----------------------------------------------------------------------- outcome

    def _conclude(self, outcome: Outcome) -> str:
        if outcome.lease_lost:
            # Not ours any more: whoever holds the job now (or the reaper) decides its state.
            return "lease lost"
        result = read_json(self.result_path) or {}
        status = result.get("status")
        if status == "completed":
            # The result file is written only after every rank finished; a non-zero exit code
            # after it (a crash while the interpreter shut down) does not undo the training.
            if outcome.returncode != 0:
                logger.warning("job %s: training completed but the child exited with %s", self.job_id,
                               outcome.returncode)
            try:
                return self._succeed(result)
            except Exception as e:
                logger.exception("job %s: recording the results failed", self.job_id)
                error = f"recording the results failed: {type(e).__name__}: {_one_line(str(e))}"
                return self._finish(JobStatus.FAILED, error=error.replace(f"{settings.data_dir}{os.sep}", ""))
        if status == "cancelled" or outcome.killed_after_cancel or self._cancel_requested():
            self._register_leftovers()
            return self._finish(JobStatus.CANCELLED)
        self._register_leftovers()
        return self._finish(JobStatus.FAILED, error=self._failure_head(outcome, result))

    def _time_limit_exceeded(self) -> str:
        limit = settings.job_time_limit_seconds
        return self._finish(JobStatus.FAILED, error=f"time limit exceeded: the job ran for more than {limit} s")

    def _cancel_requested(self) -> bool:
        try:
            job = db_call(leases.get_job, job_id=self.job_id)
        except Exception:
            return False
        return job is not None and bool(job.cancel_requested)

    def _failure_head(self, outcome: Outcome, result: dict[str, Any]) -> str:
        """One line for the job's ``error`` and the attempt's cause: the exception type and
        message (the traceback stays in the attempt's log), without the data directory's path."""
        if result.get("error"):
            head = _one_line(str(result["error"]))
        elif outcome.returncode is not None and outcome.returncode < 0:
            head = f"training process killed by signal {signal.Signals(-outcome.returncode).name}"
        else:
            head = f"training process exited with code {outcome.returncode} without a result"
        head = head.replace(f"{settings.data_dir}{os.sep}", "")
        return head if len(head) <= MAX_ERROR_CHARS else head[: MAX_ERROR_CHARS - 3] + "..."

    def _register(self, name: str, path: Path) -> dict[str, Any]:
        size, digest = path.stat().st_size, sha256_file(path)
        db_call(leases.add_artifact, job_id=self.job_id, name=name, path=str(path), size=size, sha256=digest)
        return {"path": path, "size": size, "sha256": digest}

    def _register_leftovers(self) -> None:
        """The newest checkpoint and the log of a job that did not complete (best effort)."""
        for name, path in (("checkpoint.pt", self.job_dir.latest_checkpoint()), (self.log_path.name, self.log_path)):
            if path is not None and path.is_file():
                try:
                    self._register(name, path)
                except Exception:
                    logger.warning("job %s: could not register %s", self.job_id, path, exc_info=True)

    def _succeed(self, result: dict[str, Any]) -> str:
        if self.evaluate:
            return self._succeed_evaluation(result)
        weights, metadata_path = self.job_dir.export_weights, self.job_dir.export_metadata
        metrics_path = self.job_dir.metrics
        metrics = result.get("metrics") or {}
        if not metrics_path.is_file():
            write_json_atomic(metrics_path, metrics)
        metadata = read_json(metadata_path)
        if metadata is None or not weights.is_file():
            raise FileNotFoundError(f"the export in {self.job_dir.export} is incomplete")

        stored = self._register(weights.name, weights)
        self._register(metadata_path.name, metadata_path)
        self._register(metrics_path.name, metrics_path)
        checkpoint = self.job_dir.latest_checkpoint()
        if checkpoint is not None and settings.keep_checkpoints_after_success:
            self._register("checkpoint.pt", checkpoint)
        self._register(self.log_path.name, self.log_path)

        categories = [c["name"] for c in metadata.get("categories", [])] or None
        model = db_call(
            crud.create_model,
            owner_id=self.job.owner_id,
            name=self.job.name or f"{self.job.kind}-{self.job_id[:8]}",
            config=metadata.get("model") or self.job.engine_config["student"],
            categories=categories,
            path=str(weights),
            sha256=stored["sha256"],
            size=stored["size"],
            source_job_id=self.job_id,
        )
        outcome = self._finish(JobStatus.SUCCEEDED, final_metrics=metrics, output_model_id=model.id,
                               final_step=result.get("iterations"))
        if outcome == JobStatus.SUCCEEDED and not settings.keep_checkpoints_after_success:
            # Retention, once the success is recorded (until then a retry resumes from them).
            freed = Storage(settings.data_dir).release_checkpoints(self.job_id)
            logger.info("job %s: checkpoints deleted (%d bytes; GID_KEEP_CHECKPOINTS_AFTER_SUCCESS)", self.job_id, freed)
        return outcome

    def _succeed_evaluation(self, result: dict[str, Any]) -> str:
        """An evaluation's metrics become the job's final metrics (and points at step 0)."""
        metrics = result.get("metrics") or {}
        if not self.job_dir.metrics.is_file():
            write_json_atomic(self.job_dir.metrics, metrics)
        self._register(self.job_dir.metrics.name, self.job_dir.metrics)
        self._register(self.log_path.name, self.log_path)
        return self._finish(JobStatus.SUCCEEDED, final_metrics=metrics, final_step=0)

    def _finish(self, status: JobStatus, **kwargs: Any) -> str:
        done = db_call(leases.finish_job, job_id=self.job_id, worker_id=self.worker_id, status=status.value, **kwargs)
        if not done:
            logger.warning("job %s: could not record %s (the lease was lost meanwhile)", self.job_id, status.value)
            return "lease lost"
        logger.info("job %s %s", self.job_id, status.value)
        return status.value
